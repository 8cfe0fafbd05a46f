"""The conversion command (sleep_lm.pretrained.convert) end to end on CPU: a tiny GGUF written by
tests/test_pretrained.py's helpers (GQA, untied, with its byte-level BPE tokenizer) becomes a
workdir; `sleep_lm.generate` restores it, takes a text prompt and its greedy tokens equal the NumPy
oracle's greedy continuation; `sleep_lm.evaluate` restores it too (the "text" task has no eval
sets). Under `slow`: a tied Hugging Face folder without a tokenizer converts, and generate takes
ids there; GDN layers inserted by the conversion leave the greedy tokens unchanged.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from sleep_lm.common.errors import UserError  # noqa: E402
from sleep_lm.evaluate import evaluate_workdir  # noqa: E402
from sleep_lm.generate import generate_from_workdir  # noqa: E402
from sleep_lm.pretrained import Reference, load  # noqa: E402
from sleep_lm.pretrained.convert import convert, load_tokenizer  # noqa: E402
from tests.test_pretrained import (  # noqa: E402
    VOCAB,
    hf_config,
    hf_weights,
    write_gguf,
    write_hf,
)

PROMPT = "hello the world 12"


def test_convert_then_generate_text_equals_reference_greedy(tmp_path):
  source = write_gguf(tmp_path / "tiny.gguf", hf_weights("llama", seed=5))
  ckpt, tok = load(source)
  out = convert(source, tmp_path / "run", log=lambda *_: None)
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["task"] == {"name": "text", "vocab_size": VOCAB, "seq_len": 512}
  assert cfg["model"]["attn_kv_heads"] == 2 and cfg["model"]["eviction"] == "none"
  stored = load_tokenizer(out)
  ids = tok.encode(PROMPT)
  assert stored.encode(PROMPT) == ids and (stored.bos_id, stored.eos_ids) == (1, (2,))
  lines = []
  result = generate_from_workdir(out, PROMPT, max_new_tokens=6, log=lines.append)
  want = Reference(ckpt, np.float64).greedy(ids, 6)
  assert result["prompt"] == ids
  assert result["tokens"] == [want]
  assert result["text"] == [tok.decode(want)]
  assert any(repr(tok.decode(want)) in line for line in lines)
  with pytest.raises(UserError, match="different config"):
    convert(source, out, window=8, eviction="hard", log=lambda *_: None)
  with pytest.raises(UserError, match="already holds steps"):
    convert(source, out, log=lambda *_: None)
  with pytest.raises(UserError, match="ModelConfig.passes"):       # N > 1 needs a GDN layer
    convert(source, tmp_path / "n2", eviction="hard", window=8, passes=2, log=lambda *_: None)
  assert not (tmp_path / "n2").exists()                   # refused before writing anything
  evaluated = evaluate_workdir(out)
  assert evaluated["step"] == 0 and evaluated["sets"] == {}


@pytest.mark.slow
def test_convert_tied_folder_without_tokenizer(tmp_path):
  w = hf_weights("llama", tied=True, seed=6)
  source = write_hf(tmp_path / "hf", w, hf_config(tied=True))
  out = convert(source, tmp_path / "run", log=lambda *_: None, checkpoint=load(
      source, with_tokenizer=False).checkpoint)
  assert load_tokenizer(out) is None
  ckpt, _ = load(source, with_tokenizer=False)
  result = generate_from_workdir(out, "5,17,200,3", max_new_tokens=3, log=lambda *_: None)
  assert result["tokens"] == [Reference(ckpt, np.float64).greedy([5, 17, 200, 3], 3)]
  assert result["text"] is None


@pytest.mark.slow
def test_convert_with_inserted_gdn_layers_generates_the_reference(tmp_path):
  """--gdn_layers: fresh GDN layers with zero output projections leave the function unchanged,
  through the whole path (import, insertion, checkpoint, restore, decode with GDN states)."""
  source = write_gguf(tmp_path / "tiny.gguf", hf_weights("llama", seed=5))
  ckpt, tok = load(source)
  out = convert(source, tmp_path / "run", gdn_layers=(1, 3), freeze_pretrained=True,
                log=lambda *_: None)
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["model"]["layers"] == ["attn", "gdn", "attn", "gdn"]
  assert cfg["model"]["mlp_layers"] == [True, False, True, False]
  assert cfg["optimizer"]["train_layers"] == [1, 3]
  result = generate_from_workdir(out, PROMPT, max_new_tokens=6, log=lambda *_: None)
  assert result["tokens"] == [Reference(ckpt, np.float64).greedy(tok.encode(PROMPT), 6)]
  with pytest.raises(UserError, match="give --gdn_layers"):
    convert(source, tmp_path / "other", freeze_pretrained=True, log=lambda *_: None)
