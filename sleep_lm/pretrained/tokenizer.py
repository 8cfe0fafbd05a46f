"""The tokenizer that comes with a checkpoint, built with Hugging Face's `tokenizers` library.

From a GGUF file: `tokenizer.ggml.model` must be "gpt2" (byte-level BPE: `tokenizer.ggml.tokens`
in byte-level form, `tokenizer.ggml.merges` as "left right" strings); SentencePiece ("llama") and
other models are refused by name. The pre-tokenizer follows `tokenizer.ggml.pre`, llama.cpp's
name for the split rules before BPE:
  - GPT-2's regex ("gpt-2", "gpt2", "mpt", "olmo", "jais", or absent): `ByteLevel(use_regex=True)`;
  - each digit on its own first, then GPT-2's regex ("smollm", "starcoder", "refact",
    "command-r", "codeshell", "exaone", "minerva"; SmolLM2's tokenizer.json has the same
    `Digits(individual_digits=True)` + `ByteLevel` sequence): `Sequence([Digits, ByteLevel])`.
Other pre-tokenizers (Llama 3's, Qwen2's, ...) are refused by name: use the model's Hugging Face
folder and its tokenizer.json instead. Tokens whose `tokenizer.ggml.token_type` is CONTROL (3)
become special tokens (matched whole in text, e.g. "<|im_start|>"), USER_DEFINED (4) ones added
tokens. `tokenizer.ggml.add_bos_token` / `add_eos_token` become a post-processor that adds them.

From a Hugging Face folder: `tokenizer.json` as it is (its own post-processor decides BOS), the
special ids from `tokenizer_config.json` / `config.json`, the chat template from
`tokenizer_config.json` or `chat_template.jinja`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from sleep_lm.pretrained.checkpoint import CheckpointError

GPT2_PRE = ("gpt-2", "gpt2", "mpt", "olmo", "jais")
DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                        "minerva")
CONTROL, USER_DEFINED = 3, 4   # gguf.TokenType values


@dataclasses.dataclass(frozen=True, eq=False)
class TextTokenizer:
  """A `tokenizers.Tokenizer` and the checkpoint's special ids.

  `encode` applies the tokenizer's post-processor (which adds BOS/EOS exactly when the
  checkpoint says so); `decode` keeps special tokens unless asked not to.
  """
  tokenizer: Any                   # tokenizers.Tokenizer
  bos_id: int | None = None
  eos_ids: tuple[int, ...] = ()
  pad_id: int | None = None
  chat_template: str | None = None
  source: str = ""

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token(self, i: int) -> str | None:
    return self.tokenizer.id_to_token(int(i))


def _tokenizers():
  try:
    import tokenizers
  except ImportError as e:
    raise CheckpointError("building the tokenizer needs the `tokenizers` package: pip install "
                          "'sleep_lm[pretrained]'") from e
  return tokenizers


def pre_tokenizer(pre: str | None, where: str):
  """The `tokenizers` pre-tokenizer for llama.cpp's pre-tokenizer name."""
  from tokenizers import pre_tokenizers
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
  if pre is None or pre in GPT2_PRE:
    return byte_level
  if pre in DIGITS_THEN_GPT2_PRE:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  raise CheckpointError(f"{where}: tokenizer.ggml.pre = {pre!r} is not supported; supported: "
                        f"{GPT2_PRE + DIGITS_THEN_GPT2_PRE} (or read the model's Hugging Face "
                        "folder, whose tokenizer.json carries its rules)")


def from_gguf(source) -> TextTokenizer:
  """The tokenizer stored in a GGUF file (a path or a reader from `open_gguf`)."""
  from sleep_lm.pretrained.gguf_format import field, open_gguf, reader_path
  _tokenizers()
  from tokenizers import AddedToken, Tokenizer, decoders, models, processors

  reader = source if hasattr(source, "tensors") else open_gguf(source)
  where = reader_path(reader)
  model = field(reader, "tokenizer.ggml.model", str, why="the tokenizer")
  if model != "gpt2":
    raise CheckpointError(f"{where}: tokenizer.ggml.model = {model!r} is not supported; only "
                          "'gpt2' (byte-level BPE) is (SentencePiece 'llama' vocabularies: read "
                          "the model's Hugging Face folder and its tokenizer.json)")
  tokens = field(reader, "tokenizer.ggml.tokens", list, why="the vocabulary")
  merges_text = field(reader, "tokenizer.ggml.merges", list, why="BPE merges")
  types = field(reader, "tokenizer.ggml.token_type", list, [1] * len(tokens))
  if len(types) != len(tokens):
    raise CheckpointError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for "
                          f"{len(tokens)} tokens")
  vocab = {}
  for i, t in enumerate(tokens):
    if t in vocab:
      raise CheckpointError(f"{where}: tokenizer.ggml.tokens has {t!r} twice (ids {vocab[t]} "
                            f"and {i})")
    vocab[t] = i
  merges = []
  for j, m in enumerate(merges_text):
    parts = m.split(" ")
    if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab:
      raise CheckpointError(f"{where}: tokenizer.ggml.merges[{j}] = {m!r} is not two "
                            "vocabulary tokens separated by one space")
    merges.append((parts[0], parts[1]))
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizer(field(reader, "tokenizer.ggml.pre", str, None), where)
  tok.decoder = decoders.ByteLevel()
  special = [AddedToken(t, special=True, normalized=False)
             for t, ty in zip(tokens, types, strict=True) if ty == CONTROL]
  added = [AddedToken(t, special=False, normalized=False)
           for t, ty in zip(tokens, types, strict=True) if ty == USER_DEFINED]
  tok.add_special_tokens(special)
  tok.add_tokens(added)
  for t in special + added:   # added tokens must keep their vocabulary ids
    if tok.token_to_id(t.content) != vocab[t.content]:
      raise CheckpointError(f"{where}: special token {t.content!r} did not keep its id")
  if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
    raise CheckpointError(f"{where}: the tokenizer built has {tok.get_vocab_size()} tokens, the "
                          f"file lists {len(tokens)}")

  def token_id(key):
    i = field(reader, key, int, None)
    if i is not None and not 0 <= i < len(tokens):
      raise CheckpointError(f"{where}: {key} = {i} is outside the vocabulary of {len(tokens)}")
    return i

  bos, eos = token_id("tokenizer.ggml.bos_token_id"), token_id("tokenizer.ggml.eos_token_id")
  eot = token_id("tokenizer.ggml.eot_token_id")
  add_bos = field(reader, "tokenizer.ggml.add_bos_token", bool, False)
  add_eos = field(reader, "tokenizer.ggml.add_eos_token", bool, False)
  for flag, i, name in ((add_bos, bos, "bos"), (add_eos, eos, "eos")):
    if flag and i is None:
      raise CheckpointError(f"{where}: tokenizer.ggml.add_{name}_token is set but "
                            f"tokenizer.ggml.{name}_token_id is missing")
  if add_bos or add_eos:
    single = ([tokens[bos]] if add_bos else []) + ["$A"] + ([tokens[eos]] if add_eos else [])
    ids = {tokens[i]: i for i, flag in ((bos, add_bos), (eos, add_eos)) if flag}
    tok.post_processor = processors.TemplateProcessing(single=" ".join(single),
                                                       special_tokens=list(ids.items()))
  return TextTokenizer(tok, bos_id=bos, eos_ids=tuple(dict.fromkeys(
      i for i in (eos, eot) if i is not None)), pad_id=token_id("tokenizer.ggml.padding_token_id"),
                       chat_template=field(reader, "tokenizer.chat_template", str, None),
                       source=where)


def _read_json(path: Path) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: cannot read JSON: {e}") from e


def from_hf(folder: str | os.PathLike) -> TextTokenizer:
  """The tokenizer of a Hugging Face model folder (its tokenizer.json)."""
  _tokenizers()
  from tokenizers import Tokenizer
  folder = Path(folder)
  path = folder / "tokenizer.json"
  if not path.is_file():
    raise CheckpointError(f"{folder}: no tokenizer.json (sleep_lm reads the `tokenizers` format "
                          "only, not SentencePiece .model files or vocab.json + merges.txt)")
  tok = Tokenizer.from_file(str(path))
  cfg = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
  tcfg = (_read_json(folder / "tokenizer_config.json")
          if (folder / "tokenizer_config.json").is_file() else {})

  def special(name):
    value = tcfg.get(f"{name}_token")
    if isinstance(value, dict):
      value = value.get("content")
    if isinstance(value, str):
      i = tok.token_to_id(value)
      if i is None:
        raise CheckpointError(f"{folder}: tokenizer_config.json {name}_token {value!r} is not in "
                              "tokenizer.json's vocabulary")
      return [i]
    ids = cfg.get(f"{name}_token_id")
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)

  template = tcfg.get("chat_template")
  if template is None and (folder / "chat_template.jinja").is_file():
    template = (folder / "chat_template.jinja").read_text()
  bos = special("bos")
  pad = special("pad")
  return TextTokenizer(tok, bos_id=bos[0] if bos else None,
                       eos_ids=tuple(dict.fromkeys(special("eos"))),
                       pad_id=pad[0] if pad else None,
                       chat_template=template if isinstance(template, str) else None,
                       source=str(folder))
