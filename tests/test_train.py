"""Training CLI end to end at a tiny size: resume after a kill, refusal, evaluation, sharding."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import rule110 as rule110_config
from sleep_lm import evaluate, train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40
# Tiny hybrid that still sleeps (N = 2) and has both block types.
OVERRIDES = {"model.d_model": 32, "model.attn_head_dim": 16, "model.gdn_head_dim": 16,
             "model.mlp_dim": 32, "model.layers": ("attn", "gdn"), "model.passes": 2,
             "batch_size": 8, "steps": STEPS, "log_every": 2, "checkpoint_every": 10,
             "eval_every": 20, "eval_size": 32, "eval_batch_size": 16, "task.t": 2,
             "optimizer.warmup_steps": 2}


def tiny_config(data_dir, **extra):
  config = rule110_config.get_config("smoke")
  for key, value in {**OVERRIDES, "data_dir": str(data_dir), **extra}.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def cli_args(data_dir):
  args = [f"--config={ROOT / 'experiments' / 'rule110.py'}:smoke"]
  for key, value in {**OVERRIDES, "data_dir": str(data_dir)}.items():
    value = repr(value) if isinstance(value, tuple) else value   # tuples parse as literals
    args.append(f"--config.{key}={value}")
  return args


def records(workdir, kind):
  lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  root = tmp_path_factory.mktemp("uninterrupted")
  train.train(tiny_config(root / "data"), root / "run")
  return root


def test_killed_run_resumes_to_the_uninterrupted_curve(uninterrupted, tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "sleep_lm.train", *cli_args(uninterrupted / "data"),
         f"--workdir={workdir}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  deadline = time.time() + 600
  while not (workdir / "checkpoints" / "10").is_dir():      # a finalised checkpoint (atomic)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    assert time.time() < deadline, "no checkpoint within 10 minutes"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)                          # no chance to save anything more
  proc.wait()
  killed_at = records(workdir, "train")[-1]["step"]
  assert killed_at < STEPS, "the run finished before it could be killed"

  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "resuming" in out.stdout
  resumed = {r["step"]: r["loss"] for r in records(workdir, "train")}
  reference = {r["step"]: r["loss"] for r in records(uninterrupted / "run", "train")}
  assert sorted(resumed) == sorted(reference) == list(range(2, STEPS + 1, 2))
  np.testing.assert_allclose([resumed[s] for s in sorted(resumed)],
                             [reference[s] for s in sorted(reference)], rtol=1e-6)
  assert records(workdir, "eval")[-1]["exact_accuracy"] == pytest.approx(
      records(uninterrupted / "run", "eval")[-1]["exact_accuracy"])


def test_evaluate_reports_the_runs_accuracy(uninterrupted):
  result = evaluate.evaluate_workdir(uninterrupted / "run")
  last = records(uninterrupted / "run", "eval")[-1]
  assert result["step"] == STEPS and result["examples"] == 32
  assert result["exact_accuracy"] == pytest.approx(last["exact_accuracy"])
  assert len(result["answer_accuracy"]) == 4
  assert (uninterrupted / "run" / f"eval_step{STEPS}_t2.json").exists()
  with pytest.raises(ValueError, match="available steps"):
    evaluate.evaluate_workdir(uninterrupted / "run", step=3)


def test_workdir_with_another_config_is_refused(uninterrupted):
  other = tiny_config(uninterrupted / "data", **{"task.t": 5})
  with pytest.raises(ValueError, match=r"different config(.|\n)*task\.t: 2 in the workdir, 5 now"):
    train.train(other, uninterrupted / "run")


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, r"config\.steps"),
    ("model.passes", 0, r"ModelConfig\.passes"),
    ("model.layers", ("attn", "lstm"), r"ModelConfig\.layers.*lstm"),
    ("optimizer.warmup_steps", 10_000, r"OptimizerConfig\.warmup_steps"),
])
def test_bad_config_fails_with_the_field_name(tmp_path, field, value, message):
  config = tiny_config(tmp_path / "data", **{field: value})
  with pytest.raises(ValueError, match=message):
    train.train(config, tmp_path / "run")


def test_config_arg_errors():
  with pytest.raises(ValueError, match="unknown preset 'tiny'"):
    rule110_config.get_config("tiny")
  with pytest.raises(ValueError, match="unknown override 'M'"):
    rule110_config.get_config("M=2")
  c = rule110_config.get_config("paper,N=4,t=32")
  assert (c.model.passes, c.task.t, c.model.d_model, c.model.window) == (4, 32, 256, 24)


SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from tests.test_train import tiny_config
    from sleep_lm import train
    assert jax.device_count() == 4, jax.devices()
    data, workdir = sys.argv[1], sys.argv[2]
    config = tiny_config(data, **{"steps": 6, "eval_every": 6, "checkpoint_every": 6,
                                  "mesh.data": 2, "mesh.model": 2})
    state, _ = train.initial_state(config, train.sharding.make_mesh(2, 2))
    spec = state.params["layer_1_gdn"]["q_proj"]["kernel"].sharding.spec
    print(json.dumps({"spec": [str(s) for s in spec]}))
    train.train(config, workdir)
    bad = tiny_config(data, **{"batch_size": 6, "mesh.data": 4, "mesh.model": 1})
    try:
      train.train(bad, workdir + "_bad")
      raise SystemExit("batch 6 on a 4-way data mesh was accepted")
    except ValueError as e:
      assert "batch_size (6) must be divisible by mesh.data (4)" in str(e), e
""")


def test_sharded_training_on_a_2x2_mesh_matches_one_device(tmp_path):
  """4 CPU devices (data=2, model=2): params really split, same losses as one device;
  a batch the data axis cannot split is refused by name."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(tmp_path / "data"),
                        str(tmp_path / "sharded")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  spec = json.loads(out.stdout.splitlines()[0])["spec"]
  assert spec == ["None", "model"]       # q_proj kernel: ("embed", "heads") -> (None, "model")
  single = tiny_config(tmp_path / "data", **{"steps": 6, "eval_every": 6,
                                             "checkpoint_every": 6})
  train.train(single, tmp_path / "single")
  a = [r["loss"] for r in records(tmp_path / "sharded", "train")]
  b = [r["loss"] for r in records(tmp_path / "single", "train")]
  assert len(a) == len(b) == 3
  np.testing.assert_allclose(a, b, rtol=2e-4)


def test_sigterm_stops_between_steps_and_checkpoints(uninterrupted, tmp_path):
  """Preemption: SIGTERM ends the run cleanly with a checkpoint at the step where it stopped."""
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "sleep_lm.train", *cli_args(uninterrupted / "data"),
         f"--workdir={workdir}"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 600
  while not (workdir / "checkpoints" / "10").is_dir():
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  stopped = [line for line in out.splitlines() if line.startswith("SIGTERM: stopping at step")]
  assert stopped, out[-3000:]
  step = int(stopped[0].split()[-1])
  assert 10 <= step < STEPS
  assert (workdir / "checkpoints" / str(step)).is_dir()
