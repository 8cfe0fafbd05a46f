"""Multi-host training: two CPU processes on localhost train like one process.

Two `python -m sleep_lm.train` processes (one CPU device each, gloo collectives) form one
2-device mesh through `jax.distributed.initialize` (--coordinator_address, --num_processes,
--process_id); each reads its half of every batch. Their losses must equal a one-process run
with the same global batch, and only process 0 may write the workdir's logs and take its lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import portpicker
import pytest

from experiments import rule110 as rule110_config
from sleep_lm.training import trainer
from sleep_lm.training.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
OVERRIDES = {"model.d_model": 32, "model.attn_head_dim": 16, "model.gdn_head_dim": 16,
             "model.mlp_dim": 32, "model.layers": ("attn", "gdn"), "model.passes": 2,
             "seeds": 2, "batch_size": 8, "steps": STEPS, "log_every": 1,
             "checkpoint_every": STEPS, "eval_every": STEPS, "eval_size": 16,
             "eval_batch_size": 8, "task.t": 2, "optimizer.warmup_steps": 1}


def config(data_dir):
  c = rule110_config.get_config("smoke")
  for key, value in {**OVERRIDES, "data_dir": str(data_dir)}.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def records(workdir, kind):
  lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["kind"] == kind]


def launch(workdir, data_dir, port, process_id):
  args = [f"--config={ROOT / 'experiments' / 'rule110.py'}:smoke"]
  for key, value in {**OVERRIDES, "data_dir": str(data_dir)}.items():
    args.append(f"--config.{key}={repr(value) if isinstance(value, tuple) else value}")
  cmd = [sys.executable, "-m", "sleep_lm.train", *args, f"--workdir={workdir}",
         f"--coordinator_address=localhost:{port}", "--num_processes=2",
         f"--process_id={process_id}"]
  env = dict(os.environ)   # no device-count flag: one CPU device per process
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env.update(JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow   # CI time: run with -m slow
def test_two_processes_train_like_one(tmp_path):
  """Losses of a 2-process run (2 seeds, 3 steps, one eval) equal the 1-process run's; process 0
  alone writes metrics, TensorBoard files and the log; the checkpoint is complete."""
  workdir, data_dir = tmp_path / "two", tmp_path / "data_two"      # built by the 2 processes
  port = portpicker.pick_unused_port()
  procs = [launch(workdir, data_dir, port, i) for i in range(2)]
  try:
    # The one-process reference runs meanwhile, in this (1-device) process.
    assert jax.device_count() == 1
    trainer.train(RunConfig.from_config(config(tmp_path / "data_one")), tmp_path / "one",
                  log=lambda _: None)
    outs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
  assert "process 0 of 2" in outs[0] and "process 1 of 2" in outs[1]
  assert "step      3/3" in outs[0] and "step " not in outs[1]     # one log: process 0's

  two, one = records(workdir, "train"), records(tmp_path / "one", "train")
  assert [(r["step"], r["seed"]) for r in two] == [(s, seed) for s in (1, 2, 3) for seed in (0, 1)]
  assert [(r["step"], r["seed"]) for r in two] == [(r["step"], r["seed"]) for r in one]
  # Same global batch, same math; only the order of float32 sums differs (the gradient
  # all-reduce adds two per-process partial sums, one device adds all rows at once), which Muon
  # and Adam carry from step to step: measured <= 3.1e-7 relative after 3 steps. rtol 2e-5
  # leaves room for other CPUs' summation orders; a wrong data slice or a missing all-reduce
  # moves the loss by > 1e-2.
  np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=2e-5)
  np.testing.assert_allclose([r["grad_norm"] for r in two], [r["grad_norm"] for r in one],
                             rtol=2e-5)
  ev_two, ev_one = records(workdir, "eval"), records(tmp_path / "one", "eval")
  assert len(ev_two) == len(ev_one) == 2                           # one set, two seeds
  np.testing.assert_allclose([r["loss"] for r in ev_two], [r["loss"] for r in ev_one], rtol=2e-5)
  for seed in (0, 1):
    events = list((workdir / "tensorboard" / f"seed_{seed}").iterdir())
    assert len(events) == 1, events                               # one writer: process 0
  assert (workdir / "checkpoints" / str(STEPS)).is_dir()
  # Process 0 alone took the workdir's lock (had process 1 tried too, one would be refused).
  assert json.loads((workdir / "train.lock").read_text())["pid"] == procs[0].pid


@pytest.mark.parametrize("flags, message", [
    (["--num_processes=2", "--process_id=5"], "jax.distributed.initialize failed"),
])
def test_bad_distributed_flags_fail_by_name(tmp_path, flags, message):
  out = subprocess.run(
      [sys.executable, "-m", "sleep_lm.train",
       f"--config={ROOT / 'experiments' / 'rule110.py'}:smoke", f"--workdir={tmp_path}",
       "--coordinator_address=localhost:1", *flags],
      cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=120)
  assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
  assert message in out.stderr, out.stderr[-2000:]
