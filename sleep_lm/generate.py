r"""Generate from a trained run: the command line of streaming inference.

  python -m sleep_lm.generate --workdir runs/rule110_N4_t12 --prompt 0110...Q \
      --max_new_tokens 8 [--temperature 0 --top_k 0 --seed 0 --seed_index 0 --num_streams 1]

Restores a `sleep_lm.train` workdir (its params carry a leading seed axis: --seed_index picks the
model), reads the prompt as comma-separated token ids or, for tasks with token characters (Rule
110: '0', '1', 'Q'), as a string of them, or, in the workdir of a converted pretrained model
(`sleep_lm.pretrained.convert`: it holds tokenizer/tokenizer.json), as text through that
tokenizer; feeds it to a `sleep_lm.inference.stream.Stream` and generates, then prints the tokens
(as text with a tokenizer) and the timing. User errors print one line and exit with status 2. How a
stream wakes, sleeps and evicts: `sleep_lm.inference.decoding`, docs/inference.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from sleep_lm.common.errors import UserError
from sleep_lm.common.memory import check_batch_fits
from sleep_lm.inference.decoding import init_state
from sleep_lm.inference.stream import Stream


def load_run(path: str | Path):
  """The typed run config of a `sleep_lm.train` workdir (a UserError if it is not one)."""
  from sleep_lm.training import workdir
  from sleep_lm.training.run_config import RunConfig
  return RunConfig.checked(workdir.load_config(path))


def restore_params(path: str | Path, run, *, step: int | None = None, seed_index: int = 0):
  """(params of model `seed_index` on the first device, checkpoint step) of the workdir `path`
  holding `run` (`load_run`): newest readable checkpoint, or `step`.

  The checkpoint holds every seed's train state stacked on a leading seed axis; it is restored
  into abstract arrays on one device (no initialisation to compile), then the seed is picked.
  """
  from sleep_lm.training.checkpointing import Checkpointer
  from sleep_lm.training.step import create_train_states, make_optimizer

  path = Path(path)
  if not 0 <= seed_index < run.seeds:
    raise UserError(f"--seed_index {seed_index}: the workdir holds {run.seeds} model(s) "
                    f"(seeds {list(run.model_seeds)}); give an index in [0, {run.seeds})")
  ckpt = Checkpointer(path / "checkpoints", keep=run.keep_checkpoints, read_only=True)
  try:
    steps = ckpt.steps()
    if not steps:
      raise UserError(f"no checkpoint in {path / 'checkpoints'}")
    if step is not None and step not in steps:
      raise UserError(f"--step {step} has no checkpoint; available steps: {steps}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.eval_shape(lambda: create_train_states(
        run.model, make_optimizer(run.optimizer), run.model_seeds))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            abstract)
    state, meta = (ckpt.restore_latest(abstract) if step is None
                   else ckpt.restore(abstract, step))
  finally:
    ckpt.close()
  return jax.tree.map(lambda x: x[seed_index], state.params), int(meta["step"])


def load_text_tokenizer(path: str | Path):
  """The text tokenizer a converted pretrained model's workdir holds
  (`sleep_lm.pretrained.convert`), or None."""
  if not (Path(path) / "tokenizer" / "tokenizer.json").is_file():
    return None
  from sleep_lm.pretrained.convert import load_tokenizer
  return load_tokenizer(path)


def parse_prompt(text: str, vocab_size: int, token_chars: str | None) -> list[int]:
  """Comma-separated token ids ("0,1,2"; a single id: "2,") or, when the task has token
  characters and the text has no comma, one token per character ("011Q")."""
  text = text.strip()
  if not text:
    raise UserError("--prompt is empty: give at least one token")
  if "," in text or token_chars is None:
    try:
      ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
      raise UserError(f"--prompt {text!r}: expected comma-separated token ids") from e
  else:
    unknown = sorted(set(text) - set(token_chars))
    if unknown:
      raise UserError(f"--prompt: characters {unknown} are not tokens of this task "
                      f"({dict(enumerate(token_chars))}); or give comma-separated ids")
    ids = [token_chars.index(c) for c in text]
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad or not ids:
    raise UserError(f"--prompt: token ids must be in [0, {vocab_size}), got {bad or ids}")
  return ids


def format_tokens(ids: Sequence[int], token_chars: str | None) -> str:
  if token_chars is None:
    return ",".join(str(i) for i in ids)
  return "".join(token_chars[i] for i in ids)


def generate_from_workdir(path: str | Path, prompt: str, *, max_new_tokens: int,
                          temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                          seed_index: int = 0, num_streams: int = 1, step: int | None = None,
                          log=print) -> dict:
  """The CLI's work: restores the workdir, feeds the prompt, generates; returns what it printed
  as a dict (tokens per stream, timings)."""
  if max_new_tokens < 0 or num_streams < 1 or temperature < 0 or top_k < 0:
    raise UserError(f"need --max_new_tokens >= 0, --num_streams >= 1, --temperature >= 0 and "
                    f"--top_k >= 0; got {max_new_tokens}, {num_streams}, {temperature}, {top_k}")
  run = load_run(path)
  cfg, chars = run.model, run.task.token_chars
  tok = load_text_tokenizer(path)
  if tok is None:
    ids = parse_prompt(prompt, cfg.vocab_size, chars)     # user errors before the restore
  else:
    ids = tok.encode(prompt)
    if not ids:
      raise UserError("--prompt is empty: give some text")
  show = (lambda x: repr(tok.decode(x))) if tok is not None else (
      lambda x: format_tokens(x, chars))
  params, ckpt_step = restore_params(path, run, step=step, seed_index=seed_index)
  capacity = len(ids) + max_new_tokens if cfg.eviction == "none" else None
  check_batch_fits(lambda b: init_state(cfg, b, capacity), num_streams, what="--num_streams")
  stream = Stream(cfg, params, num_streams, capacity=capacity)
  t0 = time.perf_counter()
  stream.warm_up(temperature=temperature, top_k=top_k)
  warm_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  logits = stream.feed(np.tile(np.asarray(ids, np.int32), (num_streams, 1)), last_only=True)
  jax.block_until_ready(logits)
  prefill_s = time.perf_counter() - t0
  sleeps_before = stream.sleep_events
  t0 = time.perf_counter()
  out = np.asarray(stream.generate(max_new_tokens, logits, temperature=temperature,
                                   top_k=top_k, seed=seed))
  decode_s = time.perf_counter() - t0
  log(f"workdir {path}  step {ckpt_step}  model seed {run.model_seeds[seed_index]} (index "
      f"{seed_index})  N={cfg.passes} L={cfg.window} eviction={cfg.eviction}  device "
      f"{jax.devices()[0].device_kind}")
  log(f"prompt ({len(ids)} tokens): {show(ids)}")
  for b in range(num_streams):
    log(f"stream {b}: {show(out[b].tolist())}")
  log(f"compilation of the generation loop and the sleep: {warm_s * 1e3:.1f} ms")
  log(f"prefill: {len(ids)} tokens in {prefill_s * 1e3:.1f} ms (compilation of whole-window and "
      f"partial-window prefill included)")
  per_token = decode_s / max(max_new_tokens, 1) * 1e3
  log(f"decode: {max_new_tokens} tokens in {decode_s * 1e3:.1f} ms, {per_token:.3f} ms per token "
      f"({stream.sleep_events - sleeps_before} sleep events included)")
  texts = None if tok is None else [tok.decode(row) for row in out.tolist()]
  return {"step": ckpt_step, "prompt": ids, "tokens": out.tolist(), "text": texts,
          "compile_s": warm_s, "prefill_s": prefill_s, "decode_s": decode_s,
          "sleep_events": stream.sleep_events}


def main(argv):
  from absl import flags, logging
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)   # orbax warns about read-only checkpoint options
  f = flags.FLAGS
  generate_from_workdir(
      f.workdir, f.prompt, max_new_tokens=f.max_new_tokens, temperature=f.temperature,
      top_k=f.top_k, seed=f.seed, seed_index=f.seed_index, num_streams=f.num_streams,
      step=f.step)
  return 0


if __name__ == "__main__":
  from absl import flags

  from sleep_lm import cli

  flags.DEFINE_string("workdir", None, "A sleep_lm.train workdir.")
  flags.DEFINE_string("prompt", None, "Comma-separated token ids, or the task's token "
                      "characters (Rule 110: 0, 1, Q), or text (a converted pretrained model).")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per stream.")
  flags.DEFINE_float("temperature", 0.0, "0: greedy; else sample from softmax(logits / T).")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens only (0: all).")
  flags.DEFINE_integer("seed", 0, "PRNG seed of the sampling.")
  flags.DEFINE_integer("seed_index", 0, "Which of the workdir's models (seed axis) to use.")
  flags.DEFINE_integer("num_streams", 1, "Independent streams of the same prompt (a batch).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable one).")
  cli.define_debug_flag()
  flags.mark_flags_as_required(["workdir", "prompt"])
  cli.run(main)
