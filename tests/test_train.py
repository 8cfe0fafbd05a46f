"""The trainer end to end at a tiny size: seeds, resume after a kill, evaluation, metrics,
TensorBoard, and the failures a user meets (bad config, a second writer, NaN, broken checkpoints,
a full disk, damaged workdir files, preemption), each injected for real.
"""

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import rule110 as rule110_config
from sleep_lm import evaluate
from sleep_lm.common.errors import UserError
from sleep_lm.training import evaluation, trainer, workdir
from sleep_lm.training.checkpointing import Checkpointer
from sleep_lm.training.run_config import RunConfig
from tests.workdirs import latest_params

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40
# Tiny hybrid that still sleeps (N = 2) and has both block types; two seeds at once. The log and
# checkpoint intervals differ, so a resume starts between two log lines.
OVERRIDES = {"model.d_model": 32, "model.attn_head_dim": 16, "model.gdn_head_dim": 16,
             "model.mlp_dim": 32, "model.layers": ("attn", "gdn"), "model.passes": 2,
             "batch_size": 8, "steps": STEPS, "log_every": 4, "checkpoint_every": 5,
             "eval_every": 20, "eval_size": 32, "eval_batch_size": 16, "task.t": 2,
             "optimizer.warmup_steps": 2, "seeds": 2, "keep_checkpoints": 3}


def tiny_config(data_dir, **extra):
  config = rule110_config.get_config("smoke")
  for key, value in {**OVERRIDES, "data_dir": str(data_dir), **extra}.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def tiny_run(data_dir, **extra) -> RunConfig:
  return RunConfig.from_config(tiny_config(data_dir, **extra))


def cli_args(data_dir, **extra):
  args = [f"--config={ROOT / 'experiments' / 'rule110.py'}:smoke"]
  for key, value in {**OVERRIDES, "data_dir": str(data_dir), **extra}.items():
    value = repr(value) if isinstance(value, tuple) else value   # tuples parse as literals
    args.append(f"--config.{key}={value}")
  return args


def records(path, kind, seed=None):
  rs = [r for r in workdir.read_records(Path(path) / "metrics.jsonl") if r["kind"] == kind]
  return [r for r in rs if seed is None or r["seed"] == seed]


def tensorboard_scalars(path) -> dict[tuple[str, int], float]:
  """{(tag, step): value} of an event file, read with TensorBoard's own loader."""
  from tensorboard.backend.event_processing import event_file_loader
  events = list(event_file_loader.EventFileLoader(str(path)).Load())
  assert events[0].file_version == "brain.Event:2"
  return {(v.tag, e.step): float(v.tensor.float_val[0]) for e in events for v in e.summary.value}


def tensorboard_curve(folder, tag="train/loss") -> dict[int, float]:
  """{step: value} of one tag as TensorBoard shows a folder of event files: its event
  accumulator reads them in name order and applies each file's purges (a point shown twice
  would make two steps equal)."""
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0})
  acc.Reload()
  points = [(e.step, e.value) for e in acc.Scalars(tag)]
  assert len({s for s, _ in points}) == len(points), f"a step shown twice: {points}"
  return dict(points)


def test_tensorboard_shows_a_redone_step_once(tmp_path):
  """A run killed after logging steps past its last checkpoint redoes them on resume: TensorBoard
  shows each step once, with the resumed run's value; a run killed before its first checkpoint
  restarts at 0 and replaces every point."""
  from sleep_lm.training.tensorboard import ScalarWriter
  killed = ScalarWriter(tmp_path, start_step=0)
  for step in (4, 8, 12):
    killed.scalars(step, {"train/loss": step})
  killed.close()
  time.sleep(1.1)                  # event files are named by the second: the resumed one sorts last
  resumed = ScalarWriter(tmp_path, start_step=10)
  for step in (12, 16):
    resumed.scalars(step, {"train/loss": -step})
  resumed.close()
  assert tensorboard_curve(tmp_path) == {4: 4, 8: 8, 12: -12, 16: -16}
  time.sleep(1.1)
  restarted = ScalarWriter(tmp_path, start_step=0)
  restarted.scalars(4, {"train/loss": 0.5})
  restarted.close()
  assert tensorboard_curve(tmp_path) == {4: 0.5}


def run_cli(module, args, **kw):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, **kw)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  root = tmp_path_factory.mktemp("uninterrupted")
  trainer.train(tiny_run(root / "data"), root / "run", log=lambda _: None)
  return root


def test_seeds_have_their_own_records_and_tensorboard(uninterrupted):
  run = uninterrupted / "run"
  for seed in (0, 1):
    train = records(run, "train", seed)
    assert [r["step"] for r in train] == list(range(4, STEPS + 1, 4))
    assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in train)
    evals = records(run, "eval", seed)
    assert [r["step"] for r in evals] == [20, 40] and evals[-1]["set"] == "t2"
    assert 0 < evals[-1]["floor_exact"] < 1 and evals[-1]["chance_exact"] == 1 / 16
  # The two models differ (own init, own data), and both learned something.
  last = {s: records(run, "train", s)[-1]["loss"] for s in (0, 1)}
  assert last[0] != last[1]
  assert all(records(run, "train", s)[-1]["loss"] < records(run, "train", s)[0]["loss"]
             for s in (0, 1))
  # Each seed's TensorBoard file, read back with TensorBoard's own loader, holds the numbers of
  # metrics.jsonl: every train metric at every log step, every eval metric at every eval step.
  for seed in (0, 1):
    (path,) = (run / "tensorboard" / f"seed_{seed}").glob("events.out.tfevents.*")
    got = tensorboard_scalars(path)
    want = {(f"train/{k}", r["step"]): v for r in records(run, "train", seed)
            for k, v in r.items() if k not in ("step", "kind", "seed", "tokens_per_s", "elapsed_s")}
    want |= {(f"eval/{r['set']}/{k}", r["step"]): r[k] for r in records(run, "eval", seed)
             for k in ("loss", "exact_accuracy", "query_accuracy")}
    assert {tag for tag, _ in want} >= {"train/loss", "train/grad_norm", "eval/t2/loss"}
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-6)


@pytest.mark.slow   # CI time: run with -m slow
def test_vmapped_seeds_equal_separate_runs(tmp_path):
  """S models in one vmapped step train exactly as S separate one-seed runs."""
  from sleep_lm.tasks import train_dataset
  from sleep_lm.training.step import create_train_states, make_optimizer, make_train_step
  run = tiny_run(tmp_path, seed=3, **{"model.passes": 1})   # vmap's exactness needs no sleep
  optimizer = make_optimizer(run.optimizer)
  schedule = trainer.task_schedule(run)
  step = make_train_step(run.model, optimizer, schedule=schedule)

  def losses(seeds):
    state = create_train_states(run.model, optimizer, seeds)
    data = train_dataset(run.task, run.batch_size, data_seeds=seeds)
    out = []
    for i in range(3):
      state, m = step(state, jax.tree.map(np.asarray, data[i]))
      out.append(np.asarray(m["loss"]))
    return np.stack(out, 1)                                   # [S, steps]

  together = losses((3, 4))
  apart = np.concatenate([losses((3,)), losses((4,))])
  np.testing.assert_allclose(together, apart, rtol=1e-5)
  assert not np.allclose(together[0], together[1])


def test_killed_run_resumes_to_the_uninterrupted_curve(uninterrupted, tmp_path):
  run = tmp_path / "run"
  cmd = [sys.executable, "-m", "sleep_lm.train", *cli_args(uninterrupted / "data"),
         f"--workdir={run}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  deadline = time.time() + 600
  while not (run / "checkpoints" / "10").is_dir():      # a finalised checkpoint (atomic)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    assert time.time() < deadline, "no checkpoint within 10 minutes"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)                       # no chance to save anything more
  proc.wait()
  assert records(run, "train")[-1]["step"] < STEPS, "the run finished before it was killed"
  # A TensorBoard point is on disk once written: the killed run's files hold the steps it logged
  # (the last one may have been killed between metrics.jsonl and TensorBoard).
  killed = {p: p.read_bytes() for p in run.glob("tensorboard/seed_*/events.out.tfevents.*")}
  for seed in (0, 1):
    (path,) = [p for p in killed if p.parent.name == f"seed_{seed}"]
    logged = {r["step"] for r in records(run, "train", seed)}
    assert logged - {max(logged)} <= {s for t, s in tensorboard_scalars(path)
                                      if t == "train/loss"} <= logged

  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  resumed_at = int(out.stdout.split("from step ")[1].split()[0])
  assert resumed_at % 5 == 0                       # a checkpoint step, between log lines
  for seed in (0, 1):
    # Every log line, including the one after the resume point, averages the same steps.
    got = {r["step"]: r["loss"] for r in records(run, "train", seed)}
    want = {r["step"]: r["loss"] for r in records(uninterrupted / "run", "train", seed)}
    assert sorted(got) == sorted(want) == list(range(4, STEPS + 1, 4))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                               rtol=1e-6)
    assert records(run, "eval", seed)[-1]["exact_accuracy"] == pytest.approx(
        records(uninterrupted / "run", "eval", seed)[-1]["exact_accuracy"])
    # The resumed run adds its own event file and leaves the killed run's as they were.
    folder = run / "tensorboard" / f"seed_{seed}"
    (added,) = set(folder.iterdir()) - set(killed)
    assert all(p.read_bytes() == data for p, data in killed.items() if p.parent == folder)
    loss = {s: v for (t, s), v in tensorboard_scalars(added).items() if t == "train/loss"}
    assert sorted(loss) == [s for s in sorted(want) if s > resumed_at]
    np.testing.assert_allclose([loss[s] for s in sorted(loss)],
                               [want[s] for s in sorted(loss)], rtol=1e-6)
    # TensorBoard reads the folder as the uninterrupted curve, each step once.
    shown = tensorboard_curve(folder)
    assert sorted(shown) == sorted(want)
    np.testing.assert_allclose([shown[s] for s in sorted(want)], [want[s] for s in sorted(want)],
                               rtol=1e-6)


def test_cli_init_from_starts_a_run_from_another_runs_parameters(uninterrupted, tmp_path):
  """`--config.init_from` exists in every experiment's config (experiments/common.py): one step
  at the warm-up's learning rate 0 leaves the parameters it started from, the source's last
  (a random start would differ)."""
  run = tmp_path / "continued"
  out = run_cli("sleep_lm.train", [
      *cli_args(uninterrupted / "data", steps=1, checkpoint_every=1, log_every=1, eval_every=1,
                **{"optimizer.warmup_steps": 1}),
      f"--config.init_from={uninterrupted / 'run'}", f"--workdir={run}"], timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  got, want = latest_params(run), latest_params(uninterrupted / "run")
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_complete_run_resumed_reports_its_accuracy_without_recording_it_twice(
    uninterrupted, tmp_path):
  """Launched again, a finished run evaluates its last step and returns the result; the log and
  TensorBoard gain nothing, unless the run had stopped between that step's checkpoint and its
  evaluation: then the evaluation is recorded once."""
  run = tmp_path / "run"
  shutil.copytree(uninterrupted / "run", run)
  want = {s: records(run, "eval", s) for s in (0, 1)}
  results = trainer.train(tiny_run(uninterrupted / "data"), run, log=lambda _: None)
  np.testing.assert_allclose(results["t2"]["exact_accuracy"],
                             [want[s][-1]["exact_accuracy"] for s in (0, 1)])
  for seed in (0, 1):
    assert records(run, "eval", seed) == want[seed]
    assert sorted(tensorboard_curve(run / "tensorboard" / f"seed_{seed}", "eval/t2/loss")) == [
        20, STEPS]
  log = run / "metrics.jsonl"          # as if killed after the last checkpoint, before its eval
  log.write_text("".join(json.dumps(r) + "\n" for r in workdir.read_records(log)
                         if not (r["kind"] == "eval" and r["step"] == STEPS)))
  trainer.train(tiny_run(uninterrupted / "data"), run, log=lambda _: None)
  for seed in (0, 1):
    got = records(run, "eval", seed)
    assert [r["step"] for r in got] == [20, STEPS]
    assert got[-1]["exact_accuracy"] == pytest.approx(want[seed][-1]["exact_accuracy"])


def test_evaluate_reports_each_seed_and_the_floor(uninterrupted):
  result = evaluate.evaluate_workdir(uninterrupted / "run")
  assert result["step"] == STEPS and result["seeds"] == [0, 1]
  r = result["sets"]["t2"]
  assert r["examples"] == 32 and len(r["answer_accuracy"]) == 2 == len(r["exact_accuracy"])
  for seed in (0, 1):
    last = records(uninterrupted / "run", "eval", seed)[-1]
    assert r["exact_accuracy"][seed] == pytest.approx(last["exact_accuracy"])
    assert r["loss"][seed] == pytest.approx(last["loss"], rel=1e-5)
  assert (uninterrupted / "run" / f"eval_step{STEPS}.json").exists()
  with pytest.raises(UserError, match="available steps"):
    evaluate.evaluate_workdir(uninterrupted / "run", step=3)
  deeper = evaluate.evaluate_workdir(uninterrupted / "run", task_overrides={"t": 3})
  assert list(deeper["sets"]) == ["t3"] and deeper["task"]["t"] == 3


def test_workdir_with_another_config_is_refused(uninterrupted):
  with pytest.raises(UserError, match=r"different config(.|\n)*task\.t: 2 in the workdir, 5 now"):
    trainer.train(tiny_run(uninterrupted / "data", **{"task.t": 5}), uninterrupted / "run")


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, r"^config\.steps: must be an integer >= 1, got 0$"),
    ("keep_checkpoints", 0, r"^config\.keep_checkpoints: must be an integer >= 1"),
    ("seeds", 0, r"^config\.seeds: "),
    ("tensorboard", None, r"^config\.tensorboard: must be True or False"),
    ("model.passes", 0, r"^config\.model\.passes: N must be an integer >= 1"),
    ("model.d_model", True, r"^config\.model\.d_model: must be an integer >= 1, got True"),
    ("model.layers", ("attn", "lstm"), r"^config\.model\.layers: .*lstm.*allowed"),
    ("optimizer.warmup_steps", 10_000, r"^config\.optimizer\.warmup_steps: must be in \[0, "),
    ("optimizer.adamw_lr", float("inf"), r"^config\.optimizer\.adamw_lr: must be a finite"),
    ("optimizer.muon_lr", float("nan"), r"^config\.optimizer\.muon_lr"),
    ("optimizer.train_layers", (0, 9), r"^config\.optimizer\.train_layers: layer indices must "
     r"be < the model's"),
    ("task.t", -1, r"^config\.task\.t: must be an integer >= 0, got -1$"),
    ("task.foo", 1, r"^config\.task: unknown field\(s\) \['foo'\] .*; allowed: \['seed', 't'\]$"),
    ("model.foo", 1, r"^config\.model: unknown field\(s\) \['foo'\]; allowed: \['attention_"),
])
def test_bad_config_fails_with_the_field_name(tmp_path, field, value, message):
  with pytest.raises(ValueError, match=message):
    tiny_run(tmp_path / "data", **{field: value})


def test_a_failed_launch_leaves_the_workdir_free(tmp_path):
  """Config and mesh are checked before the workdir is claimed, so the fixed command runs."""
  fast = {"steps": 2, "eval_every": 2, "seeds": 1, "model.passes": 1}
  bad = tiny_run(tmp_path / "data", **{"mesh.data": 4, **fast})
  with pytest.raises(UserError, match=r"config.mesh: data x fsdp x tensor = 4 must equal"):
    trainer.train(bad, tmp_path / "run")
  assert not (tmp_path / "run" / "config.json").exists()
  trainer.train(tiny_run(tmp_path / "data", **fast), tmp_path / "run", log=lambda _: None)


def test_cli_user_errors_are_one_line_with_status_2(tmp_path):
  (tmp_path / "file").write_text("")
  cases = [
      (["--config.model.foo=1"], tmp_path / "w1",
       "unknown field config.model.foo (--config.model.foo=1); allowed in config.model: "
       "['attention_implementation', 'attn_head_dim', "),
      (["--config.keep_checkpoints=0"], tmp_path / "w2",
       "config.keep_checkpoints: must be an integer >= 1, got 0"),
      (["--config.optimizer.adamw_lr=inf"], tmp_path / "w3",
       "config.optimizer.adamw_lr: must be a finite"),
      # settable from the command line (the large model's fast compile, experiments/rule110.py)
      (["--config.model.scan_layers=True", "--config.model.unroll=False",
        "--config.model.remat=blocks"], tmp_path / "file", "exists and is not a directory"),
  ]
  for extra, path, message in cases:
    out = run_cli("sleep_lm.train", [*cli_args(tmp_path / "data"), *extra, f"--workdir={path}"],
                  timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
  out = run_cli("sleep_lm.evaluate", [f"--workdir={tmp_path / 'nothing'}"], timeout=300)
  assert out.returncode == 2 and "config.json not found" in out.stderr


def test_a_full_disk_is_a_user_error(tmp_path):
  """config.json cannot be written (its temporary file is /dev/full): one line, status 2."""
  run = tmp_path / "run"
  run.mkdir()
  os.symlink("/dev/full", run / "config.json.tmp")
  out = run_cli("sleep_lm.train", [*cli_args(tmp_path / "data"), f"--workdir={run}"],
                timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "No space left on device" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow   # CI time: run with -m slow
def test_nan_stops_the_run_and_is_never_saved(tmp_path):
  """A learning rate of 1e9: the run stops naming the step; no checkpoint holds a NaN."""
  fast = {"seeds": 1, "model.passes": 1, "eval_every": 1000}   # what is tested needs no sleep
  run = tiny_run(tmp_path / "data", **{"optimizer.muon_lr": 1e9, "optimizer.adamw_lr": 1e9,
                                       "log_every": 1, "checkpoint_every": 1, **fast})
  with pytest.raises(trainer.TrainingDiverged, match=r"not finite at step (\d+) \(seed 0\)"):
    trainer.train(run, tmp_path / "run", log=lambda _: None)
  steps = Checkpointer(tmp_path / "run" / "checkpoints", read_only=True).steps()
  mesh, boxed = trainer.setup(run)
  state, _ = trainer.initial_state(run, mesh, boxed)
  ckpt = Checkpointer(tmp_path / "run" / "checkpoints", read_only=True)
  for step in steps:
    restored, _ = ckpt.restore(state, step)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))
  ckpt.close()
  bad = [r for r in records(tmp_path / "run", "train") if r["loss"] is None]
  assert not bad or bad[0]["step"] > max(steps, default=0)   # NaN logged as null, never saved
  skipping = tiny_run(tmp_path / "data", **{"optimizer.muon_lr": 1e9, "optimizer.adamw_lr": 1e9,
                                            "skip_nonfinite": True, "steps": 6, **fast})
  trainer.train(skipping, tmp_path / "skip", log=lambda _: None)
  assert sum(r["skipped"] for r in records(tmp_path / "skip", "train")) > 0


def test_a_broken_newest_checkpoint_falls_back_to_the_previous(uninterrupted, tmp_path):
  for damage in ("truncate", "metadata"):
    run = tmp_path / damage
    shutil.copytree(uninterrupted / "run", run)
    ckpt_dir = run / "checkpoints"
    newest = str(max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()))
    if damage == "truncate":
      files = [p for p in (ckpt_dir / newest / "state").rglob("*") if p.is_file()
               and p.stat().st_size > 100 and "METADATA" not in p.name]
      for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    else:
      for p in (ckpt_dir / newest).rglob("_METADATA"):
        p.unlink()
    messages = []
    result = evaluate.evaluate_workdir(run)
    assert result["step"] < int(newest)
    run_config = RunConfig.from_config(workdir.load_config(run))
    mesh, boxed = trainer.setup(run_config)
    state, _ = trainer.initial_state(run_config, mesh, boxed)
    ckpt = Checkpointer(ckpt_dir, read_only=True)
    _, meta = ckpt.restore_latest(state, log=messages.append)
    ckpt.close()
    assert meta["step"] == result["step"]
    assert messages[0].startswith(f"checkpoint step {newest} cannot be restored")
    assert messages[-1] == f"resumed from step {meta['step']}, the newest readable checkpoint"


def test_metrics_log_is_strict_json_and_survives_a_torn_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  log = workdir.MetricsLog(path, 0)
  log.write({"step": 1, "kind": "train", "loss": float("nan"), "x": [1.0, float("inf")]})
  log.write({"step": 2, "kind": "train", "loss": 0.5})
  text = path.read_text()
  assert "NaN" not in text and "Infinity" not in text
  assert json.loads(text.splitlines()[0])["loss"] is None
  with path.open("a") as f:
    f.write('{"step": 3, "kind": "tra')                      # a crash mid-write
  warnings = []
  assert [r["step"] for r in workdir.read_records(path, warn=warnings.append)] == [1, 2]
  assert "torn last line" in warnings[0]
  workdir.MetricsLog(path, 1)                                # a resume at step 1
  assert [r["step"] for r in workdir.read_records(path)] == [1]
  path.write_text('{"step": 1, "kind": "train"}\nnot json\n{"step": 2, "kind": "train"}\n')
  with pytest.raises(UserError, match=r"metrics\.jsonl: line 2: not JSON \(Expecting value: "
                                      r"line 1 column 1\); fix or remove the line$"):
    workdir.read_records(path)


def one_line_error(stderr: str) -> str:
  """The last line of stderr, checked to be the CLI's one-line error (library warnings, e.g.
  TFDS's, may precede it; no traceback may)."""
  assert "Traceback" not in stderr, stderr[-3000:]
  return stderr.strip().splitlines()[-1]


def test_one_writer_per_workdir_and_sigterm_exits_75(uninterrupted, tmp_path):
  """Two trainings into one workdir: the second is refused at once (status 2) naming the holder
  while evaluation runs beside it; then preemption: SIGTERM stops the first between two steps,
  checkpoints the step it stopped at and exits 75, and its lock is gone with it."""
  run = tmp_path / "run"
  cmd = [sys.executable, "-m", "sleep_lm.train", *cli_args(uninterrupted / "data"),
         f"--workdir={run}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 600
    while not (run / "checkpoints" / "10").is_dir():
      assert first.poll() is None and time.time() < deadline
      time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)     # it keeps its lock, and cannot finish meanwhile
    try:
      t0 = time.time()
      second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
      assert second.returncode == 2, second.stderr[-3000:]
      line = one_line_error(second.stderr)
      assert re.fullmatch(
          rf"error: workdir {re.escape(str(run))} is in use by another training run \(pid "
          rf"{first.pid} on host {re.escape(socket.gethostname())}, since [^)]+\); one run "
          rf"writes a workdir at a time: .*", line), line
      assert time.time() - t0 < 120 and second.stdout.count("step ") == 0  # refused at once
      assert evaluate.evaluate_workdir(run)["step"] >= 10          # a reader runs beside it
    finally:
      first.send_signal(signal.SIGCONT)
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=300)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 75, err[-3000:]
  stopped = [line for line in out.splitlines() if line.startswith("SIGTERM: stopping at step")]
  assert stopped, out[-3000:]
  step = int(stopped[0].split()[-1])
  assert 10 <= step < STEPS
  assert one_line_error(err) == (f"preempted: SIGTERM: stopped at step {step} of {STEPS} with "
                                 f"its checkpoint saved; the same command continues the run")
  assert (run / "checkpoints" / str(step)).is_dir()
  with workdir.Lock(run):                  # released by the kernel with the process
    pass


def test_a_full_disk_stops_the_run_and_leaves_the_older_checkpoints(uninterrupted, tmp_path):
  """A checkpoint that cannot be written for want of space: one line, status 2, the run stops at
  the next step (no evaluation after the failed save), the older checkpoint, config and metrics
  survive and no temporary folder is left behind.

  The disk is real: a tmpfs (mounted here, as root) holding the finished run cut back to its
  step-30 checkpoint and sized to leave 256 KiB free, less than one checkpoint (~520 KiB), so
  that orbax's background threads fail while writing step 35 with the ValueError
  RESOURCE_EXHAUSTED (ENOSPC) a full disk gives. Without root the same writes fail for real
  under RLIMIT_FSIZE (EFBIG: no file may grow past 16 KiB; the checkpoint's files are larger,
  the run's other files smaller), which tests the same path with another cause."""
  src = tmp_path / "src"
  shutil.copytree(uninterrupted / "run", src)
  for p in (src / "checkpoints").iterdir():
    if p.name.isdigit() and int(p.name) > 30:
      shutil.rmtree(p)
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = os.geteuid() == 0 and subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)]).returncode == 0
  run = disk / "run"
  try:
    shutil.copytree(src, run)
    if mounted:
      used = int(subprocess.check_output(["df", "-k", "--output=used", str(disk)],
                                         text=True).split()[-1])
      subprocess.run(["mount", "-o", f"remount,size={used + 256}k", str(disk)], check=True)
      limit_file_size = None
    else:
      def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))
    out = run_cli("sleep_lm.train", [*cli_args(uninterrupted / "data"), f"--workdir={run}"],
                  timeout=600, preexec_fn=limit_file_size)
    assert out.returncode == 2, out.stderr[-3000:]
    cause = "No space left on device" if mounted else "File too large"
    assert one_line_error(out.stderr) == (
        f"error: cannot save checkpoint step 35 in {run / 'checkpoints'}: {cause}; the run "
        f"stops here (steps kept: [30])")
    assert "resuming" in out.stdout and "eval step" not in out.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["30"]   # no tmp folder
    for p in (src / "checkpoints" / "30").rglob("*"):          # the old checkpoint is intact
      if p.is_file():
        assert (run / "checkpoints" / "30" / p.relative_to(src / "checkpoints" / "30")
                ).read_bytes() == p.read_bytes()
    assert (run / "config.json").read_text() == (src / "config.json").read_text()
    assert [r["step"] for r in records(run, "eval", seed=0)] == [20]       # no eval past it
    assert [r["step"] for r in records(run, "train", seed=0)][:7] == [4, 8, 12, 16, 20, 24, 28]
  finally:
    if mounted:
      subprocess.run(["umount", "-l", str(disk)])


def test_damaged_workdir_files_are_one_line_errors_naming_them(uninterrupted, tmp_path):
  """config.json, metrics.jsonl and the eval sets' metadata, each damaged for real on disk, end
  in a UserError naming the file and what is wrong with it (the lock file: the test below)."""
  config = tmp_path / "w" / "config.json"
  config.parent.mkdir()
  held = (uninterrupted / "run" / "config.json").read_text()
  for text, problem in [("", "empty"), ('{"task": ', "not JSON (Expecting value: line 1 "),
                        ("[1, 2]", "not a JSON object (a list)"),
                        ("{}", "missing field(s) ['mesh', 'model', 'optimizer', 'seed', ")]:
    config.write_text(text)
    readers = [lambda: workdir.load_config(config.parent)]
    if text != "{}":                  # training compares the whole config: "{}" is another one
      readers.append(lambda: workdir.claim(config.parent, tiny_config(tmp_path / "data")))
    for read in readers:
      with pytest.raises(UserError) as e:
        read()
      assert str(e.value).startswith(f"{config}: {problem}"), str(e.value)
  config.write_bytes(b"\xff\xfe" + held.encode())
  with pytest.raises(UserError, match=r"config\.json: not text \(byte 0 is not UTF-8\)"):
    workdir.load_config(config.parent)

  # metrics.jsonl: a last line that is JSON but no record is dropped like a torn one.
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text('{"step": 1, "kind": "train"}\n{"step": 2, "kind": "train"}\n'
                     '{"loss": 1.0}\n')
  warnings = []
  workdir.MetricsLog(metrics, 2, warn=warnings.append)               # a resume at step 2
  assert [r["step"] for r in workdir.read_records(metrics)] == [1, 2]
  assert "ignoring a torn last line (missing field(s) ['kind', 'step']" in warnings[0]
  metrics.write_text('{"step": 1, "kind": "train"}\n{"step": "2", "kind": "train"}\n'
                     '{"step": 3, "kind": "train"}\n')
  with pytest.raises(UserError, match=r"metrics\.jsonl: line 2: its step is not an integer "
                                      r"\('2'\); fix or remove the line$"):
    workdir.MetricsLog(metrics, 3)

  # The eval sets' metadata (TFDS would raise a protobuf traceback).
  data = tmp_path / "data"
  shutil.copytree(uninterrupted / "data", data)
  (info,) = data.glob("sleep_lm_eval/rule110_t2_*/*/dataset_info.json")
  info.write_text("{}")
  with pytest.raises(UserError, match=rf"^{re.escape(str(info))}: missing field\(s\) \['name', "
                                      rf"'splits'\]; delete {re.escape(str(info.parent))} to "
                                      r"rebuild the set$"):
    evaluation.prepare_eval_sets(tiny_run(data).task, size=32, data_dir=data)


def test_the_workdir_lock_is_exclusive_and_names_its_holder(tmp_path):
  """A real flock: a second writer is refused at once, naming the holder's pid and host; a lock
  file without them (the instant between locking and writing, or damaged) is said to be so."""
  with workdir.Lock(tmp_path / "w"):
    with pytest.raises(workdir.WorkdirBusy, match=rf"\(pid {os.getpid()} on host "
                                                  rf"{re.escape(socket.gethostname())}, since "):
      workdir.Lock(tmp_path / "w")
    (tmp_path / "w" / "train.lock").write_text("")
    with pytest.raises(workdir.WorkdirBusy, match=r"its pid and host are unknown: .*train\.lock "
                                                  r"is empty\); one run writes a workdir"):
      workdir.Lock(tmp_path / "w")
  with workdir.Lock(tmp_path / "w"):                    # released: free again
    assert json.loads((tmp_path / "w" / "train.lock").read_text())["pid"] == os.getpid()


def test_leftover_temporary_checkpoints_are_removed_by_the_writer(uninterrupted, tmp_path):
  """A save that never completed leaves "<step>.orbax-checkpoint-tmp": the writer removes it
  when it opens the folder (the older steps stay), a reader (evaluate, generate) never does. The
  leftover is a copy of a real step under orbax's temporary name."""
  ckpt_dir = tmp_path / "checkpoints"
  shutil.copytree(uninterrupted / "run" / "checkpoints", ckpt_dir)
  shutil.copytree(ckpt_dir / "40", ckpt_dir / "45.orbax-checkpoint-tmp")
  reader = Checkpointer(ckpt_dir, keep=3, read_only=True)
  assert reader.steps() == [30, 35, 40]
  reader.close()
  assert (ckpt_dir / "45.orbax-checkpoint-tmp").is_dir()
  writer = Checkpointer(ckpt_dir, keep=3, clean=True)
  writer.close()
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ["30", "35", "40"]


def test_evaluate_task_overrides_are_checked_by_name(uninterrupted):
  run = uninterrupted / "run"
  for overrides, message in [
      ({"t": "abc"}, r"^--task: config\.task\.t: must be an integer, got 'abc'$"),
      ({"t": 2.5}, r"^--task: config\.task\.t: must be an integer, got 2\.5$"),
      ({"T": "3"}, r"^--task: config\.task: unknown field\(s\) \['T'\]; allowed: "
                   r"\['seed', 't'\]$"),
      ({"t": "-1"}, r"^config\.task\.t: must be an integer >= 0, got -1$"),
  ]:
    with pytest.raises(UserError, match=message):
      evaluate.evaluate_workdir(run, task_overrides=overrides)
  with pytest.raises(UserError, match=r"--task: expected KEY=VALUE items, got 't'"):
    evaluate._parse_overrides("t")
  assert evaluate._parse_overrides("t=3,seed=1") == {"t": "3", "seed": "1"}


def test_generate_num_streams_is_bounded_by_memory(uninterrupted):
  from sleep_lm import generate
  from sleep_lm.common import memory
  run = generate.load_run(uninterrupted / "run")
  make = lambda b: generate.init_state(run.model, b)
  per_stream = memory.bytes_per_item(make)
  limit, _ = memory.max_items(per_stream, jax.devices()[0])
  assert per_stream == memory.tree_bytes(jax.eval_shape(lambda: make(3))) - memory.tree_bytes(
      jax.eval_shape(lambda: make(2))) > 0
  assert 1 <= limit < 10**12
  with pytest.raises(UserError, match=rf"^--num_streams {10**12} does not fit: each holds "
                                      r".* of state \(.*\), so at most (\d+); ask for fewer$") as e:
    generate.generate_from_workdir(uninterrupted / "run", "0110", max_new_tokens=1,
                                   num_streams=10**12)
  told = int(re.search(r"at most (\d+)", str(e.value)).group(1))
  assert abs(told - limit) <= limit / 2          # the free memory moves a little meanwhile


def test_cli_damaged_files_and_missing_platforms_are_one_line(uninterrupted, tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text("")
  out = run_cli("sleep_lm.evaluate", [f"--workdir={run}"], timeout=300)
  assert out.returncode == 2 and out.stderr.strip().splitlines() == [
      f"error: {run / 'config.json'}: empty; restore it from a copy of the run"], out.stderr
  wanted = "tpu" if jax.devices()[0].platform == "gpu" else "cuda"
  out = subprocess.run([sys.executable, "-m", "sleep_lm.evaluate",
                        f"--workdir={uninterrupted / 'run'}"], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "JAX_PLATFORMS": wanted}, timeout=300)
  assert out.returncode == 2, out.stderr[-3000:]
  (line,) = out.stderr.strip().splitlines()
  assert line.startswith(f"error: JAX_PLATFORMS={wanted} asks for a platform this machine "
                         f"cannot start (") and "; available here: cpu" in line, line
