r"""Evaluate a trained run on its held-out set.

  python -m sleep_lm.evaluate --workdir runs/rule110_N4_t8 [--step 750] [--t 8]

Prints exact accuracy (all answers right) and per-answer accuracy, and writes
<workdir>/eval_step<STEP>_t<T>.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from absl import app, flags, logging

from sleep_lm import sharding, train


def evaluate_workdir(workdir: str | Path, *, step: int | None = None,
                     t: int | None = None) -> dict:
  workdir = Path(workdir)
  config = train.load_workdir_config(workdir)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
  state, _ = train.initial_state(config, mesh)
  manager = train.checkpoint_manager(workdir, config)
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
    if step is not None and step not in steps:
      raise ValueError(f"--step {step} has no checkpoint; available steps: {sorted(steps)}")
    state, meta = train.restore(manager, state, step)
  finally:
    manager.close()
  data_dir = Path(config.data_dir) if config.data_dir else workdir / "eval_data"
  result = train.evaluate(config, state.params, mesh, data_dir=data_dir, t=t)
  result = {"step": int(meta["step"]), **result}
  out = workdir / f"eval_step{result['step']}_t{result['t']}.json"
  out.write_text(json.dumps(result, indent=2))
  return result


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  workdir = flags.FLAGS.workdir
  r = evaluate_workdir(workdir, step=flags.FLAGS.step, t=flags.FLAGS.t)
  print(f"workdir {workdir}  step {r['step']}  t={r['t']}  ({r['examples']} held-out "
        f"examples, devices: {jax.device_count()})")
  print(f"exact accuracy      {r['exact_accuracy']:.4f}   (chance 1/16 = 0.0625)")
  for i, acc in enumerate(r["answer_accuracy"]):
    print(f"answer {i} accuracy   {acc:.4f}")
  return 0


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A sleep_lm.train workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_integer("t", None, "Evaluate at another automaton depth t (default: trained t).")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
