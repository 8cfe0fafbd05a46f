"""Long context (issue 27): experiments/long_context.py's stages, the chain that runs them, the
evaluation at other lengths, the memory tool and the plot.

Default suite: every preset combination builds a valid run config with the designed lengths,
windows and token budgets; later stages refuse a missing or mismatched init by name; the
evaluation lengths give eval sets of their seq_len (64K included); `sleep_lm.evaluate`'s
length overrides work on a run trained with a curriculum; the decode-latency size is the trained
model; the memory tool compiles the attention step at two lengths; the plot and its table read
runs laid out as the chain leaves them. `slow`: the whole smoke chain on the CPU (stopped by a
deadline, resumed, finished, rerun as a no-op), then the plot of what it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import inference_latency, long_context, long_context_chain, plot_long_context
from sleep_lm import evaluate
from sleep_lm.common.errors import PREEMPTED_STATUS, UserError
from sleep_lm.training import evaluation, trainer, workdir
from sleep_lm.training.run_config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"N1": "hybrid,N=1", "N4": "hybrid,N=4", "attn": "attn"}


def config(preset: str, model: str, stage: str, init: str = "unused", extra: str = ""):
  parts = [preset, MODELS[model], stage] + ([f"init={init}"] if stage != "short" else [])
  return long_context.get_config(",".join(p for p in parts + [extra] if p))


@pytest.mark.parametrize("preset", ["", "gpu", "smoke"])
def test_every_preset_combination_builds_with_the_designed_stages(preset):
  size = "smoke" if preset == "smoke" else "full"
  tokens = {}
  for model in MODELS:
    for stage in long_context.STAGES:
      c = config(preset, model, stage)
      run = RunConfig.from_config(c)
      lengths = long_context.STAGE_LENGTHS[size][stage]
      assert (run.task.min_len, run.task.max_len) == lengths
      assert run.task.seq_len == long_context.seq_len(c)
      assert run.init_from == ("" if stage == "short" else "unused")
      assert run.task.curriculum == () or stage == "short"
      if model == "attn":
        assert set(run.model.layers) == {"attn"} and run.model.eviction == "none"
      else:
        assert run.model.layers.count("gdn") == len(run.model.layers) // 2
        assert run.model.eviction == "hard"
        assert run.model.passes == int(model[1:])
        assert run.model.window == long_context.WINDOWS[size][stage]
        assert run.task.seq_len % run.model.window == 0
      if stage != "short":
        assert run.model.remat == ("blocks" if model == "attn" else "full")
        assert run.model.attention_implementation == ("cudnn" if preset == "gpu" else None)
      assert run.seeds == (3 if preset == "gpu" else 1)
      assert run.model.dtype == ("bfloat16" if preset == "gpu" else "float32")
      tokens[model, stage] = long_context.tokens_per_seed(c)
  # the short stage: until recall is learned (attention 4x the steps); later: the same tokens
  assert tokens["attn", "short"] == 4 * tokens["N1", "short"] == 4 * tokens["N4", "short"]
  for stage in ("8k", "32k"):
    assert len({tokens[m, stage] for m in MODELS}) == 1
  if size == "full":
    assert tokens["N1", "8k"] == 8 * 8192 * 1000 and tokens["N1", "32k"] == 2 * 32768 * 500
    assert (config(preset, "N1", "8k").task.max_len, config(preset, "N1", "32k").task.max_len
            ) == (8174, 32750)
  # the hybrid's 32K problem spans 16 windows, the answer in the last
  assert config(preset, "N4", "32k").task.max_len // config(preset, "N4", "32k").model.window \
      == (15 if size == "full" else 7)


def test_later_stages_need_an_init_and_the_same_model(tmp_path):
  for stage in ("8k", "32k"):
    with pytest.raises(ValueError, match=r"init=<workdir> \(config.init_from\)"):
      long_context.get_config(f"smoke,hybrid,{stage}")
  with pytest.raises(ValueError, match="N must be 1"):
    long_context.get_config("smoke,attn,short,N=4")
  with pytest.raises(ValueError, match="choose one of"):
    long_context.get_config("smoke,8k,32k,init=x")
  source = tmp_path / "N1_short"
  workdir.claim(source, config("smoke", "N1", "short"))
  with pytest.raises(ValueError, match=r"init=.*N1_short \(config.init_from\).*passes = 1"):
    config("smoke", "N4", "8k", init=str(source))
  with pytest.raises(ValueError, match="model.layers"):
    config("smoke", "attn", "8k", init=str(source))
  assert config("smoke", "N1", "8k", init=str(source)).init_from == str(source)


def test_a_missing_init_workdir_is_refused_before_the_run_starts(tmp_path):
  run = RunConfig.checked(config("smoke", "N1", "8k", init=str(tmp_path / "absent")))
  with pytest.raises(UserError, match="config.init_from"):
    trainer.train(run, tmp_path / "run", log=lambda *_: None)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("size", ["smoke", "full"])
def test_eval_lengths_give_eval_sets_of_their_seq_len(size, tmp_path):
  preset = "smoke" if size == "smoke" else ""
  for model in MODELS:
    final = config(preset, model, "32k")
    lengths = long_context.EVAL_LENGTHS[size]
    long_context.check(final, list(lengths.values()))      # the answer in one window at each
    expected = {"8k": 8192, "32k": 32768, "64k": 65536} if size == "full" else {
        "8k": 512, "32k": 1024, "64k": 2048}
    for name, (min_len, max_len) in lengths.items():
      c = final.copy_and_resolve_references()
      evaluate.apply_task_overrides(c, {"min_len": str(min_len), "max_len": str(max_len)})
      evaluate.drop_training_only_fields(c, {"min_len": min_len})
      run = RunConfig.checked(c)
      assert run.task.seq_len == expected[name]
      assert len(trainer.task_schedule(run)) == (
          1 if model == "attn" else expected[name] // run.model.window)
      if size == "smoke" and model == "N1":
        sets = evaluation.prepare_eval_sets(run.task, size=2, data_dir=tmp_path)
        assert sets[0].source[1]["inputs"].shape == (expected[name],)
        assert [s.name for s in sets] == ["op1", "op2", "op4"]
      elif size == "full" and model == "N1" and name == "64k":
        example = run.task.eval_examples("op1", [0])
        assert example["inputs"].shape == (1, 65536)
        assert example["loss_mask"][0, 65518:65536].sum() >= 2      # ANSWER .. END


def test_evaluate_at_another_length_drops_the_training_curriculum():
  c = config("smoke", "N1", "short")
  assert c.task.curriculum and max(s[2] for s in c.task.curriculum) == 80
  overrides = {"min_len": "40", "max_len": "70"}
  shorter = c.copy_and_resolve_references()
  evaluate.apply_task_overrides(shorter, overrides)
  with pytest.raises(ValueError, match="curriculum"):
    RunConfig.from_config(shorter)                 # a stage longer than max_len: refused
  evaluate.drop_training_only_fields(shorter, overrides)
  run = RunConfig.from_config(shorter)
  assert run.task.curriculum == () and run.task.seq_len == 80
  # eval sets never read the curriculum: the same set id with it or without it
  assert run.task.eval_set_id("op1") == "gsm_symbolic_op1_len40-70_maxop4_qfirst_left_s0"


def test_the_decode_latency_size_is_the_trained_model():
  model = config("gpu", "N4", "32k").model
  size = inference_latency.SIZES["gsm_long"]
  for field in ("d_model", "mlp_dim", "window", "dtype", "attn_head_dim", "gdn_head_dim"):
    assert size[field] == model[field], field
  assert tuple(size["layers"]) == tuple(model.layers)
  assert size["vocab_size"] == RunConfig.from_config(config("gpu", "N4", "32k")).task.vocab_size
  attention = inference_latency.attention_config("gsm_long", "cudnn")
  assert attention.layers == ("attn",) * 4 and attention.eviction == "none"


def test_the_memory_tool_compiles_the_attention_step_at_two_lengths(capsys):
  from experiments import long_context_memory
  rows = long_context_memory.main(["--preset", "smoke", "--models", "attn",
                                   "--lengths", "8k,32k"])
  assert [r["seq_len"] for r in rows] == [512, 1024]
  assert all("error" not in r and r["remat"] == "blocks" for r in rows)
  # the T x T scores: twice the length, about four times the temporaries
  assert rows[1]["temp_bytes"] > 2.5 * rows[0]["temp_bytes"]
  assert "total GiB" in capsys.readouterr().out


def test_the_chain_plans_the_stages_in_order_and_the_other_lengths(tmp_path):
  args = long_context_chain.parse_args(["--preset", "smoke", "--root", str(tmp_path),
                                        "--set", "8k:steps=3", "--set", "all:seed=2"])
  jobs = long_context_chain.plan(args, args.root)
  assert list(jobs) == ["N1", "N4", "attn"]
  for model, chain in jobs.items():
    assert [j.name for j in chain] == ["short", "8k", "32k", "eval_8k", "eval_64k"]
    assert not any(j.done() for j in chain)
    short, k8, k32, e8, e64 = (" ".join(j.cmd) for j in chain)
    assert "init=" not in short and f"init={tmp_path / model / 'short'}" in k8
    assert f"init={tmp_path / model / '8k'}" in k32 and "steps=3" in k8 and "steps=3" not in k32
    assert all("seed=2" in c for c in (short, k8, k32))
    assert f"--workdir={tmp_path / model / '32k'}" in e64
    assert "--task=min_len=1536,max_len=2038" in e64 and "--task=min_len=384,max_len=502" in e8
  assert chain[-1].log == tmp_path / "attn" / "32k" / "eval_64k.log"
  for bad in (["--set", "8k:N=4"], ["--set", "64k:steps=3"], ["--stages", "8k,32k"],
              ["--models", "N0"], ["--lengths", "128k"], ["--mem", "N3=0.3"],
              ["--mem", "N1=1.5"]):
    with pytest.raises(SystemExit):
      long_context_chain.parse_args(["--preset", "smoke", "--root", str(tmp_path), *bad])
  specs = long_context_chain.eval_set_specs(args)
  assert sorted({(f["min_len"], f["max_len"]) for f, _ in specs}) == [
      (72, 118), (384, 502), (768, 1014), (1536, 2038)]
  assert all(size == 4 for _, size in specs)


def _fabricate(root: Path, model: str, exact: dict[int, list[float]]) -> None:
  """A model's two stages as the chain leaves them: config.json, metrics.jsonl (train and eval
  records as the trainer writes them) and an eval JSON as sleep_lm.evaluate writes it."""
  final = None
  for stage in ("short", "32k"):
    c = config("smoke", model, stage)
    path = root / model / stage
    workdir.claim(path, c)
    run = RunConfig.from_config(c)
    seeds = list(run.model_seeds) + [run.seed + 1]
    records = [{"step": s, "kind": "train", "seed": seed, "loss": 1.0, "elapsed_s": 10.0 * s,
                "token_accuracy": 0.1 * s + seed} for s in (1, 2) for seed in seeds]
    records += [{"step": 1, "kind": "train", "seed": seed, "loss": 0.5, "elapsed_s": 5.0,
                 "token_accuracy": 0.3} for seed in seeds]   # a resumed process: clock restarts
    sets = {"op1": {"examples": 4, "loss": [0.5, 0.5], "exact_accuracy": exact[1024],
                    "answer_accuracy": [[x] for x in exact[1024]],
                    "query_accuracy": exact[1024], "floor_root_only": 1.0,
                    "floor_all_derivable": 1.0, "chance_exact": 1.0}}
    records += [{"step": c.steps, "kind": "eval", **r}
                for r in evaluation.per_seed_records(sets, seeds)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    final = (path, run, c)
  path, run, c = final
  other = {**sets["op1"], "exact_accuracy": exact[2048], "floor_root_only": 0.9}
  fields = {**run.task.fields(), "min_len": 1536, "max_len": 2038}
  (path / "eval_step2_max_len2038_min_len1536.json").write_text(json.dumps(
      {"step": c.steps, "seeds": [0, 1], "task": fields, "sets": {"op1": other}}))


def test_the_plot_reads_the_chain_layout_and_prints_the_table(tmp_path, capsys):
  _fabricate(tmp_path, "N4", {1024: [0.5, 0.7], 2048: [0.2, 0.4]})
  _fabricate(tmp_path, "attn", {1024: [1.0, 1.0], 2048: [0.0, 0.0]})
  (tmp_path / "chain.jsonl").write_text(json.dumps(
      {"model": "N4", "job": "32k", "status": "done", "seconds": 120.0}) + "\n")
  models = plot_long_context.load_runs([tmp_path])
  assert [m["name"] for m in models] == ["N4", "attn"]
  n4 = models[0]["results"]
  assert sorted(n4) == [1024, 2048]
  assert n4[1024]["sets"]["op1"]["exact"] == [0.5, 0.7]
  assert n4[2048]["sets"]["op1"]["floor_root_only"] == 0.9
  assert plot_long_context.train_seconds(models[0]["chains"][0]["stages"][0]["records"]) == 25.0
  curves = plot_long_context.curves(models)
  assert sorted(curves) == ["32k", "short"]
  n4_lines = curves["32k"][models[0]["label"]]
  assert len(n4_lines) == 2                       # one per seed
  steps, loss, accuracy = n4_lines[0]
  assert steps == [1, 2] and loss == [0.5, 1.0]   # step 1 as the resumed process logged it last
  assert accuracy == [0.3, 0.2 + models[0]["chains"][0]["stages"][1]["run"].seed]
  plot_long_context.main(["--root", str(tmp_path), "--out", str(tmp_path / "lc.png"),
                          "--curves", str(tmp_path / "curves.png")])
  out = capsys.readouterr().out
  assert (tmp_path / "lc.png").stat().st_size > 0
  assert (tmp_path / "curves.png").stat().st_size > 0
  row = next(line for line in out.splitlines() if line.startswith("hybrid N = 4")
             and " 2K " in line)
  assert "0.300" in row and "0.141" in row          # mean and sample sd of 0.2, 0.4
  assert "attention, full cache" in out
  # the same model run with other seeds in another root: the seeds are pooled
  _fabricate(tmp_path / "more", "N4", {1024: [0.9, 0.9], 2048: [0.6, 0.8]})
  pooled = plot_long_context.load_runs([tmp_path, tmp_path / "more"])
  assert pooled[0]["results"][2048]["sets"]["op1"]["exact"] == [0.2, 0.4, 0.6, 0.8]
  assert len(pooled[0]["chains"]) == 2 and len(pooled) == 2
  assert [len(c["stages"]) for c in pooled[0]["chains"]] == [2, 2]
  assert any(line.startswith("hybrid N = 4") and " 32k " in line and line.rstrip().endswith(
      "0.600") and "2.0" in line for line in out.splitlines())    # wall 2.0 min, op1 at 1K


def _chain(root: Path, *extra: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, "-m", "experiments.long_context_chain", "--preset",
                         "smoke", "--root", str(root), "--poll", "0.5", *extra],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
def test_the_smoke_chain_stops_resumes_finishes_and_is_plotted(tmp_path):
  root = tmp_path / "lc"
  stopped = _chain(root, "--deadline", "20")
  assert stopped.returncode == PREEMPTED_STATUS, stopped.stdout + stopped.stderr
  assert "deadline" in stopped.stdout
  done = _chain(root)
  assert done.returncode == 0, done.stdout + done.stderr
  for model in ("N1", "N4", "attn"):
    final = root / model / "32k"
    for max_len, min_len in ((502, 384), (2038, 1536)):
      data = json.loads((final / f"eval_step2_max_len{max_len}_min_len{min_len}.json")
                        .read_text())
      assert data["task"]["max_len"] == max_len and set(data["sets"]) == {"op1", "op2", "op4"}
    assert long_context_chain.last_step_evaluated(final, 2)
  records = [json.loads(x) for x in (root / "chain.jsonl").read_text().splitlines()]
  assert {(r["model"], r["job"]) for r in records if r["status"] == "done"} == {
      (m, j) for m in ("N1", "N4", "attn") for j in ("short", "8k", "32k", "eval_8k", "eval_64k")}
  again = _chain(root)
  assert again.returncode == 0 and again.stdout.count("done before, skipped") == 15
  assert len((root / "chain.jsonl").read_text().splitlines()) == len(records)
  plot_long_context.main(["--root", str(root), "--out", str(tmp_path / "lc.png")])
  models = plot_long_context.load_runs([root])
  assert {m["label"] for m in models} == {"hybrid N = 1 (hard, L = 128)",
                                         "hybrid N = 4 (hard, L = 128)",
                                         "attention, full cache"}
  for m in models:
    assert sorted(m["results"]) == [512, 1024, 2048]
    assert all(0.0 <= np.mean(s["exact"]) <= 1.0 for r in m["results"].values()
               for s in r["sets"].values())
