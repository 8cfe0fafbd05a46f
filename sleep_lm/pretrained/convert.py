r"""A pretrained checkpoint as a sleep_lm workdir that `sleep_lm.generate` and `sleep_lm.evaluate`
restore.

  python -m sleep_lm.pretrained.convert --source SmolLM2-135M-Instruct.Q4_1.gguf \
      --workdir runs/smollm2 [--eviction none | --eviction hard --window 512] [--dtype float32]
      [--gdn_layers 10,20 [--passes 2] [--freeze_pretrained]]
  python -m sleep_lm.generate --workdir runs/smollm2 --prompt "The capital of France is" \
      --max_new_tokens 8

--source: a .gguf file or a Hugging Face folder (`sleep_lm.pretrained.load`). The workdir gets
  config.json      a run config (`sleep_lm.training.run_config.RunConfig`): the all-attention
                   model of `importer.model_config`, the task "text" (`sleep_lm.tasks.text`:
                   the checkpoint's vocabulary, no data), one seed, the default optimizer recipe
  checkpoints/0/   the train state at step 0 (orbax, through `sleep_lm.training.checkpointing`): the
                   imported parameters on the seed axis and a fresh optimizer state
  tokenizer/       tokenizer.json (the `tokenizers` file), tokenizer_config.json (the chat
                   template) and config.json (bos/eos/pad ids), which
                   `sleep_lm.pretrained.tokenizer.from_hf` reads back; `sleep_lm.generate` then
                   takes text prompts and prints text
With --gdn_layers, fresh GDN layers are inserted (`sleep_lm.model.retrofit`: no MLP, zero output
projection, so the function is the pretrained one until trained); --freeze_pretrained writes the
retrofit's stage 1 into the optimizer config (`train_layers`: only the new layers train).
The workdir is claimed like a training run's (its lock, its config.json); converting into a
workdir that holds another config, or a checkpoint already, is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import ml_collections

from sleep_lm.common.errors import UserError
from sleep_lm.common.files import write_atomic
from sleep_lm.model import sharding
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.retrofit import insert_gdn_layers
from sleep_lm.pretrained.checkpoint import Checkpoint
from sleep_lm.pretrained.importer import import_params, model_config
from sleep_lm.pretrained.tokenizer import TextTokenizer
from sleep_lm.training import workdir

TOKENIZER_DIR = "tokenizer"


def run_config(checkpoint: Checkpoint, model: ModelConfig, *, name: str,
               seq_len: int | None = None,
               train_layers: tuple[int, ...] | None = None) -> ml_collections.ConfigDict:
  """The run config of a converted checkpoint whose model is `model` (validated by `RunConfig`
  when it is used); `train_layers`: `OptimizerConfig.train_layers` (None: all train)."""
  model = dataclasses.asdict(model)
  vocab = model.pop("vocab_size")               # the task sets it (RunConfig)
  c = ml_collections.ConfigDict()
  c.name = name
  c.seed = 0
  c.seeds = 1
  c.task = dict(name="text", vocab_size=vocab,
                seq_len=seq_len or min(checkpoint.arch.context_length, 2048))
  c.model = model
  c.optimizer = dict(muon_lr=2e-3, adamw_lr=5e-5, warmup_steps=0, decay_fraction=0.2,
                     weight_decay=0.0, clip_norm=1.0, b1=0.9, b2=0.95, muon_momentum=0.95,
                     muon_nesterov=True)
  if train_layers is not None:
    c.optimizer.train_layers = tuple(train_layers)
  c.batch_size = 1
  c.steps = 1
  c.log_every = 1
  c.eval_every = 1
  c.eval_size = 1
  c.eval_batch_size = 1
  c.checkpoint_every = 1
  c.keep_checkpoints = 2
  c.data_dir = ""
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding_rules = sharding.DEFAULT_RULES
  c.skip_nonfinite = False
  c.tensorboard = False
  return c


def save_tokenizer(tok: TextTokenizer, folder: Path) -> None:
  """tokenizer.json + the special ids and chat template, as `tokenizer.from_hf` reads them."""
  folder.mkdir(parents=True, exist_ok=True)
  tok.tokenizer.save(str(folder / "tokenizer.json"))
  ids = {"bos_token_id": tok.bos_id, "eos_token_id": list(tok.eos_ids),
         "pad_token_id": tok.pad_id}
  write_atomic(folder / "config.json", json.dumps(ids, indent=2))
  write_atomic(folder / "tokenizer_config.json",
               json.dumps({"chat_template": tok.chat_template}, indent=2))


def load_tokenizer(path: str | Path) -> TextTokenizer | None:
  """The tokenizer stored in a workdir by `convert`, or None if it holds none."""
  folder = Path(path) / TOKENIZER_DIR
  if not (folder / "tokenizer.json").is_file():
    return None
  from sleep_lm.pretrained.tokenizer import from_hf
  return from_hf(folder)


def convert(source: str | Path, path: str | Path, *, eviction: str = "none",
            window: int | None = None, dtype: str = "float32", seq_len: int | None = None,
            passes: int = 1, gdn_layers: tuple[int, ...] = (), freeze_pretrained: bool = False,
            checkpoint: Checkpoint | None = None, tokenizer: TextTokenizer | None = None,
            log=print) -> Path:
  """Writes the workdir `path` from `source` (or from an already loaded `checkpoint` and
  `tokenizer`, `source` then only naming it). Returns the workdir's path.

  gdn_layers: fresh GDN layers (no MLP, zero output projection: the function unchanged) at
  these indices of the new stack (`sleep_lm.model.retrofit`); freeze_pretrained: the run config's
  optimizer trains only them (the retrofit's stage 1)."""
  from sleep_lm.training import trainer
  from sleep_lm.training.checkpointing import Checkpointer
  from sleep_lm.training.run_config import RunConfig
  from sleep_lm.training.step import make_optimizer

  path = Path(path)
  if checkpoint is None:
    from sleep_lm.pretrained.sources import load
    checkpoint, tokenizer = load(source)
  if freeze_pretrained and not gdn_layers:
    raise UserError("--freeze_pretrained trains only the inserted layers: give --gdn_layers")
  try:                                                 # errors before anything is written
    model = model_config(checkpoint.arch, eviction=eviction, window=window, dtype=dtype,
                         passes=1)
    params = import_params(checkpoint, model)
    if gdn_layers:
      model, params = insert_gdn_layers(model, params, gdn_layers, jax.random.key(0))
    model = dataclasses.replace(model, passes=passes)
  except ValueError as e:                              # a ModelConfig field (FieldError)
    raise UserError(str(e)) from e
  config = run_config(checkpoint, model, name=f"pretrained:{Path(source).name}",
                      seq_len=seq_len,
                      train_layers=tuple(gdn_layers) if freeze_pretrained else None)
  run = RunConfig.checked(config)
  mesh, boxed = trainer.setup(run)
  with workdir.Lock(path, warn=log):
    workdir.claim(path, config)
    ckpt = Checkpointer(path / "checkpoints", keep=run.keep_checkpoints, clean=True)
    try:
      if ckpt.steps():
        raise UserError(f"{path / 'checkpoints'} already holds steps {ckpt.steps()}: convert "
                        "into a new --workdir")
      optimizer = make_optimizer(run.optimizer)
      state = trainer.state_from_params(run, mesh, boxed, optimizer,
                                        jax.tree.map(lambda x: x[None], params))  # seed axis
      ckpt.save(state, 0, {"step": 0, "data_position": 0, "pending": []})
    finally:
      ckpt.close()
    if tokenizer is not None:
      save_tokenizer(tokenizer, path / TOKENIZER_DIR)
  a = checkpoint.arch
  log(f"converted {source} ({a.family}, {a.layers} layers, d {a.d_model}, {a.heads}/{a.kv_heads} "
      f"heads, {checkpoint.num_parameters:,} parameters) into {path}: layers "
      f"{''.join('A' if k == 'attn' else 'G' for k in run.model.layers)}, eviction {eviction}, "
      f"N={passes}, tokenizer {'stored' if tokenizer is not None else 'absent'}")
  return path


def _indices(items) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in items)
  except ValueError:
    raise UserError(f"--gdn_layers: expected comma-separated layer indices, got "
                    f"{','.join(items)!r}") from None


def main(argv):
  from absl import flags, logging
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # orbax logs every step of a save at INFO
  f = flags.FLAGS
  convert(f.source, f.workdir, eviction=f.eviction, window=f.window, dtype=f.dtype,
          seq_len=f.seq_len, passes=f.passes,
          gdn_layers=_indices(f.gdn_layers), freeze_pretrained=f.freeze_pretrained)
  return 0


if __name__ == "__main__":
  from absl import flags

  from sleep_lm import cli

  flags.DEFINE_string("source", None, "A .gguf file or a Hugging Face model folder.")
  flags.DEFINE_string("workdir", None, "The sleep_lm workdir to write (new).")
  flags.DEFINE_enum("eviction", "none", ["none", "hard", "sliding"],
                    "none: the pretrained model exactly (one window); hard/sliding: --window L.")
  flags.DEFINE_integer("window", None, "L, for --eviction hard or sliding.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
  flags.DEFINE_integer("seq_len", None, "The text task's example length (default: the context "
                       "length, at most 2048).")
  flags.DEFINE_integer("passes", 1, "N, passes per window (N > 1 needs --gdn_layers and a "
                       "window eviction).")
  flags.DEFINE_list("gdn_layers", [], "Indices in the new stack of fresh GDN layers to insert "
                    "(no MLP, zero output projection), e.g. 2,5.")
  flags.DEFINE_bool("freeze_pretrained", False, "The run config's optimizer trains only the "
                    "inserted GDN layers (the retrofit's stage 1).")
  cli.define_debug_flag()
  flags.mark_flags_as_required(["source", "workdir"])
  cli.run(main)
