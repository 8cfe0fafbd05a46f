"""experiments/processes.py with real children (`python -c`): env defaults, SIGTERM forwarded
and the previous handler restored, each outcome."""

import json
import os
import signal
import sys
import time

from experiments import processes
from sleep_lm.common.errors import PREEMPTED_STATUS

# Says it is ready, then waits; on SIGTERM exits PREEMPTED_STATUS, like a trainer after its
# checkpoint.
PREEMPTIBLE = ("import signal, sys, time\n"
               f"signal.signal(signal.SIGTERM, lambda *_: sys.exit({PREEMPTED_STATUS}))\n"
               "print('ready', flush=True)\n"
               "time.sleep(60)\n")


def _reap_all(pool, timeout=30.0):
  ended, t0 = [], time.time()
  while pool and time.time() - t0 < timeout:
    ended += pool.reap()
    time.sleep(0.05)
  assert not pool, "children still running"
  return {c.key: c for c in ended}


def test_the_env_defaults_are_set_and_the_users_values_kept(monkeypatch, tmp_path):
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  env = processes.child_env(3)
  assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.300"
  assert processes.child_env(0)["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.900"
  assert processes.child_env(3, 0.25)["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.250"
  monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
  env = processes.child_env(3)
  assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
  assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
  assert processes.child_env(3, 0.25)["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.250"  # forced
  # the child sees its env; its output is appended to its log, in a folder made for it
  pool = processes.Pool()
  log = tmp_path / "a" / "train.log"
  log.parent.mkdir()
  log.write_text("before\n")
  cmd = [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]
  pool.start("env", cmd, log, {**env, "CUDA_VISIBLE_DEVICES": "3"})
  pool.start("new", [sys.executable, "-c", "print('hi')"], tmp_path / "b" / "c" / "x.log",
             env)
  ended = _reap_all(pool)
  before, line = log.read_text().splitlines()
  seen = json.loads(line)
  assert before == "before" and seen["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
  assert seen["CUDA_VISIBLE_DEVICES"] == "3" and ended["env"].env["CUDA_VISIBLE_DEVICES"] == "3"
  assert (tmp_path / "b" / "c" / "x.log").read_text() == "hi\n"
  assert ended["env"].rc == 0 and ended["env"].seconds > 0 and ended["env"].handle.closed


def test_a_sigterm_is_forwarded_and_a_preempted_child_is_stopped(tmp_path):
  pool = processes.Pool()
  logs = {k: tmp_path / f"{k}.log" for k in ("preempt", "killed", "fails", "ok")}
  pool.start("preempt", [sys.executable, "-c", PREEMPTIBLE], logs["preempt"], os.environ)
  pool.start("killed", [sys.executable, "-c", "print('ready', flush=True); "
                        "import time; time.sleep(60)"], logs["killed"], os.environ)
  pool.start("fails", [sys.executable, "-c", "import sys; sys.exit(3)"], logs["fails"],
             os.environ)
  pool.start("ok", [sys.executable, "-c", "pass"], logs["ok"], os.environ)
  t0 = time.time()
  # Two children running, two already ended (not yet reaped) when the SIGTERM comes: on a
  # loaded machine a child's start takes seconds, so wait for both conditions.
  while not (all(logs[k].exists() and "ready" in logs[k].read_text()
                 for k in ("preempt", "killed"))
             and all(pool.children[k].proc.poll() is not None for k in ("fails", "ok"))):
    assert time.time() - t0 < 60, "the children did not start or end"
    time.sleep(0.05)
  previous = signal.getsignal(signal.SIGTERM)
  stops = []
  with processes.on_sigterm(lambda: stops.append(pool.terminate())):
    os.kill(os.getpid(), signal.SIGTERM)       # to this process: forwarded to the children
    ended = _reap_all(pool)
  assert stops == [4] and signal.getsignal(signal.SIGTERM) is previous
  rcs = {k: c.rc for k, c in ended.items()}
  assert rcs == {"preempt": PREEMPTED_STATUS, "killed": -signal.SIGTERM, "fails": 3, "ok": 0}
  assert processes.outcome(rcs["preempt"]) == "stopped"
  assert processes.outcome(rcs["fails"]) == "FAILED (3)"
  assert processes.outcome(rcs["ok"]) == "done"
  # killed by the SIGTERM: a failure, unless the launcher is stopping
  assert processes.outcome(rcs["killed"]) == f"FAILED ({-signal.SIGTERM})"
  assert processes.outcome(rcs["killed"], stopping=True) == "stopped"
  # where the launcher can tell, the results decide
  assert processes.outcome(0, done=False) == "FAILED (0, its results missing)"
  assert processes.outcome(0, done=False, stopping=True) == "stopped"
  assert processes.outcome(PREEMPTED_STATUS, done=True) == "done"
  assert processes.outcome(3, done=False, stopping=True) == "FAILED (3)"


def test_terminate_with_wait_leaves_nothing_running(tmp_path):
  pool = processes.Pool()
  child = pool.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"],
                     tmp_path / "s.log", os.environ)
  assert pool.terminate(wait=True) == 1
  assert child.proc.returncode == -signal.SIGTERM
  assert [c.key for c in pool.reap()] == ["sleeper"] and not pool
