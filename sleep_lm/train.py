r"""Train hybrid models that sleep, from an ml-collections config (the CLI; the loop is
`sleep_lm.training.trainer`).

  python -m sleep_lm.train --config experiments/rule110.py:smoke --workdir /tmp/rule110_smoke
  python -m sleep_lm.train --config experiments/rule110.py:N=4,t=12 --config.seeds=3 \
      --workdir runs/rule110_N4_t12

The workdir holds everything a run needs to continue: config.json (a different config is
refused), checkpoints/ (orbax, atomic and asynchronous), metrics.jsonl (one JSON object per log
or eval point and seed), tensorboard/ (event files per seed) and eval_data/ (the TFDS held-out
sets, unless config.data_dir names another place). Repeating the command after a crash or a kill
continues from the last checkpoint and reproduces the uninterrupted run.

Multi-host (several processes, one per host or per GPU; docs/launching.md): every process runs
the same command with the same --workdir on a shared file system, plus either
  --coordinator_address=HOST:PORT --num_processes=P --process_id=I     (explicit), or
  --distributed                     (JAX detects SLURM, Open MPI, Cloud TPU, Kubernetes; it also
                                     reads JAX_COORDINATOR_ADDRESS and JAX_LOCAL_DEVICE_IDS),
and `jax.distributed.initialize` runs before anything touches the devices. Process 0 alone
writes config.json, metrics.jsonl, TensorBoard files and the log; every process feeds its own
part of each batch and writes its part of the checkpoints.

One run writes a workdir at a time: the first takes <workdir>/train.lock (process 0 of a
multi-host run), a second is refused at once naming the holder's pid and host; `evaluate` and
`generate` only read and run beside it.

Exit status: 0 when the run is complete; 2 for user errors (a config value, the workdir, a
damaged file, a checkpoint that cannot be read or written, the disk), printed as one line
(`--debug` shows their traceback); 75 (EX_TEMPFAIL) when SIGTERM stopped the run before its last
step, after its checkpoint: rerun the same command to continue (docs/reliability.md).
"""

from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from sleep_lm import cli
from sleep_lm.common.errors import UserError


def initialize_distributed(*, distributed: bool, coordinator_address: str | None,
                           num_processes: int | None, process_id: int | None) -> bool:
  """Calls `jax.distributed.initialize` when the flags ask for several processes; returns
  whether it did. Must run before any JAX call that touches the devices."""
  if not (distributed or coordinator_address or num_processes is not None
          or process_id is not None):
    return False
  import jax
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  except (ValueError, RuntimeError) as e:
    raise UserError(f"jax.distributed.initialize failed: {e}; give --coordinator_address, "
                    f"--num_processes and --process_id, or run under a cluster JAX "
                    f"detects (SLURM, Open MPI, Cloud TPU)") from e
  return True


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # orbax logs every checkpoint file at INFO
  f = flags.FLAGS
  initialize_distributed(distributed=f.distributed, coordinator_address=f.coordinator_address,
                         num_processes=f.num_processes, process_id=f.process_id)
  cli.check_platform()
  import jax

  from sleep_lm.training import trainer
  from sleep_lm.training.run_config import RunConfig

  config = RunConfig.checked(flags.FLAGS.config)
  print(f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} local device(s), {jax.device_count()} in all: "
        f"{jax.local_devices()}", flush=True)
  results = trainer.train(config, flags.FLAGS.workdir, log=lambda line: print(line, flush=True))
  if jax.process_index() != 0:
    return 0
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
  flags.DEFINE_bool("distributed", False, "Multi-host: jax.distributed.initialize() with the "
                    "cluster's auto-detection (SLURM, Open MPI, Cloud TPU, ...).")
  flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0.")
  flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
  flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0..P-1.")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main, check_platform_first=False)   # main checks it after jax.distributed
