r"""What one training step of the long-context models needs in device memory, per length.

  # GPU (bf16, cuDNN attention and XLA's for comparison; compiled only, nothing allocated):
  python -m experiments.long_context_memory --preset gpu --models attn,N1,N4 \
      --lengths 8k,32k,64k --remat blocks,full --attention cudnn,xla,pallas_triton \
      --json $OUT/memory.json
  # the same, also allocated and run (3 steps, the last 2 timed): peak bytes and ms/step
  python -m experiments.long_context_memory --preset gpu --models attn,N1,N4 \
      --lengths 8k,32k,64k --run --json $OUT/memory_run.json
  # CPU, smoke sizes (XLA attention):
  python -m experiments.long_context_memory --preset smoke --models attn,N1 --lengths 8k,32k

Each row is the jitted train step of experiments/long_context.py's 32k-stage config of a model
(the same step the trainer runs: forward and backward through every window-pass, the
optimizer), with the task's lengths set to --lengths' (8k, 32k, 64k: seq_len 8,192, 32,768,
65,536; smoke: 512, 1,024, 2,048), --batch sequences per seed and --seeds seeds, under each
--remat policy and --attention implementation (default: the config's). It is lowered and
compiled from shapes alone; XLA's memory analysis gives the bytes of the arguments (train state
and batch), outputs, temporaries and aliased (donated) buffers; `total` = arguments + outputs +
temporaries - aliased: what the step needs at its peak, to set against the device's memory (an
H200: 139 GiB; XLA_PYTHON_CLIENT_MEM_FRACTION of it when several runs share it). With --run the
step is also timed by `experiments.throughput.time_step` (state and a batch allocated, one
warm-up step, the median of two): ms per step, tokens/s (summed over the seeds) and the
device's peak bytes in use (GPU). A row that fails (out of memory
at compile time, cuDNN on a CPU) records its error and the others go on.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from experiments import long_context, throughput
from experiments.long_context_chain import model_arg
from sleep_lm.training import trainer
from sleep_lm.training.run_config import RunConfig


def gib(n) -> str:
  return "-" if n is None else f"{n / 2**30:.2f}"


def _num(value, fmt: str) -> str:
  return "-" if value is None else format(value, fmt)


def step_config(preset: str, model: str, length: str, *, batch: int, seeds: int,
                remat: str | None, attention: str | None):
  """The 32k stage's config of `model` at the eval length `length`."""
  size = "smoke" if "smoke" in preset.split(",") else "full"
  arg = ",".join([p for p in preset.split(",") if p] + [model_arg(model), "32k",
                                                        f"batch={batch}", f"seeds={seeds}",
                                                        "init=unused"])
  c = long_context.get_config(arg)
  c.task.min_len, c.task.max_len = long_context.EVAL_LENGTHS[size][length]
  if remat:
    c.model.remat = remat
  if attention:
    c.model.attention_implementation = None if attention == "xla" else attention
  long_context.check(c)
  return RunConfig.from_config(c)


def measure(run: RunConfig, *, execute: bool, iters: int = 2) -> dict:
  mesh, boxed = trainer.setup(run)
  abstract, optimizer = trainer.initial_state(run, mesh, boxed, abstract=True)
  step, batch_sh = trainer.sharded_train_step(run, mesh, boxed, optimizer)
  shape = (run.seeds, run.batch_size, run.task.seq_len)
  batch = {"inputs": jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sh),
           "targets": jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sh),
           "loss_mask": jax.ShapeDtypeStruct(shape, np.float32, sharding=batch_sh)}
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step.lower(abstract, batch).compile()
  row = {"compile_s": time.perf_counter() - t0}
  mem = compiled.memory_analysis()
  if mem is not None:
    row.update(argument_bytes=int(mem.argument_size_in_bytes),
               output_bytes=int(mem.output_size_in_bytes),
               temp_bytes=int(mem.temp_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes))
    row["total_bytes"] = (row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"]
                          - row["alias_bytes"])
  if execute:   # experiments.throughput's timing (real state and data; it compiles again)
    timed = throughput.time_step(run, warmup=1, iters=iters)
    stats = jax.devices()[0].memory_stats() or {}
    row.update(ms_per_step=timed["ms_per_step"], tokens_per_s=timed["tokens_per_s"],
               peak_bytes_in_use=stats.get("peak_bytes_in_use"),
               bytes_limit=stats.get("bytes_limit"))
  return row


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="gpu", help="presets of experiments/long_context.py")
  parser.add_argument("--models", default="attn", help="attn and/or N<passes>, comma-separated")
  parser.add_argument("--lengths", default="8k,32k,64k")
  parser.add_argument("--batch", type=int, default=None,
                      help="sequences per seed (default: the 32k stage's)")
  parser.add_argument("--seeds", default=None,
                      help="comma-separated seed counts (default: the preset's)")
  parser.add_argument("--remat", default="", help="comma-separated remat policies "
                      "(default: the config's: blocks for attn, full for the hybrids)")
  parser.add_argument("--attention", default="",
                      help="comma-separated: xla, cudnn, pallas_triton (default: the config's)")
  parser.add_argument("--run", action="store_true", help="also allocate, run and time it")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  size = "smoke" if "smoke" in args.preset.split(",") else "full"
  probe = long_context.get_config(",".join(filter(None, [args.preset, "32k", "init=unused"])))
  batch = args.batch or probe.batch_size
  rows = []
  for model in filter(None, args.models.split(",")):
    for length in filter(None, args.lengths.split(",")):
      if length not in long_context.EVAL_LENGTHS[size]:
        parser.error(f"--lengths: {length!r} not in {list(long_context.EVAL_LENGTHS[size])}")
      for seeds in [int(s) for s in (args.seeds or str(probe.seeds)).split(",")]:
        for remat in args.remat.split(",") if args.remat else [None]:
          for attention in args.attention.split(",") if args.attention else [None]:
            run = step_config(args.preset, model, length, batch=batch, seeds=seeds,
                              remat=remat, attention=attention)
            row = {"model": model, "length": length, "seq_len": run.task.seq_len,
                   "batch": run.batch_size, "seeds": run.seeds, "remat": run.model.remat,
                   "attention": run.model.attention_implementation or "xla",
                   "dtype": run.model.dtype, "device": jax.devices()[0].device_kind}
            try:
              row.update(measure(run, execute=args.run))
            except Exception as e:  # noqa: BLE001 - one row out of memory must not stop the rest
              lines = [x for x in str(e).splitlines() if x.strip()]
              row["error"] = f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
            rows.append(row)
            print(json.dumps(row), flush=True)
  print(f"\n{'model':<6}{'length':>7}{'B':>3}{'S':>3}{'remat':>8}{'attention':>14}"
        f"{'args GiB':>9}{'temp GiB':>9}{'total GiB':>10}{'peak GiB':>9}{'ms/step':>9}"
        f"{'tok/s':>10}")
  for r in rows:
    head = (f"{r['model']:<6}{r['length']:>7}{r['batch']:>3}{r['seeds']:>3}{r['remat']:>8}"
            f"{r['attention']:>14}")
    if "error" in r:
      print(f"{head}  {r['error'][:100]}")
      continue
    print(f"{head}{gib(r.get('argument_bytes')):>9}{gib(r.get('temp_bytes')):>9}"
          f"{gib(r.get('total_bytes')):>10}{gib(r.get('peak_bytes_in_use')):>9}"
          f"{_num(r.get('ms_per_step'), '.1f'):>9}{_num(r.get('tokens_per_s'), '.0f'):>10}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
