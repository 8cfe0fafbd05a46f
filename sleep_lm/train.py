r"""Train hybrid models that sleep, from an ml-collections config (the CLI; the loop is
`sleep_lm.trainer`).

  python -m sleep_lm.train --config experiments/rule110.py:smoke --workdir /tmp/rule110_smoke
  python -m sleep_lm.train --config experiments/rule110.py:N=4,t=12 --config.seeds=3 \
      --workdir runs/rule110_N4_t12

The workdir holds everything a run needs to continue: config.json (a different config is
refused), checkpoints/ (orbax, atomic and asynchronous), metrics.jsonl (one JSON object per log
or eval point and seed), tensorboard/ (event files per seed) and eval_data/ (the TFDS held-out
sets, unless config.data_dir names another place). Repeating the command after a crash or a kill
continues from the last checkpoint and reproduces the uninterrupted run.

User errors (a config value, the workdir, a checkpoint, the disk) print one or two lines and
exit with status 2; `--debug` shows their traceback.
"""

from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from sleep_lm import cli


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # orbax logs every checkpoint file at INFO
  import jax

  from sleep_lm import trainer
  from sleep_lm.run_config import RunConfig

  config = RunConfig.checked(flags.FLAGS.config)
  print(f"devices: {jax.devices()}", flush=True)
  results = trainer.train(config, flags.FLAGS.workdir, log=lambda line: print(line, flush=True))
  for name, r in results.items():
    mean = sum(r["exact_accuracy"]) / len(r["exact_accuracy"])
    print(f"held-out exact accuracy on {name}: {mean:.4f} (mean of {len(r['exact_accuracy'])} "
          f"seed(s); majority-answer floor {r['floor_exact']:.4f}, chance "
          f"{r['chance_exact']:.4f})")
  return 0


if __name__ == "__main__":
  # Flags live here, not at import, so that tests and tools can import this module freely.
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (created if absent).")
  cli.define_debug_flag()
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
