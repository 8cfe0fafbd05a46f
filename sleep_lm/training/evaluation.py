"""Held-out evaluation of trained models (one or several seeds) on a task's eval sets.

For each eval set and each seed: the masked loss (mean cross-entropy over supervised tokens: the
paper's "test loss"), exact accuracy (every supervised token of an example right), the accuracy
of each answer (all tokens of one `answer_group` right) and their mean. Beside them, the
reference levels an accuracy must be read against, computed from the set itself:
  floor_exact / floor_answer: a constant predictor that answers, at every supervised position,
    the most common target of that position in the set (for Rule 110 at t >= 10 it scores ~9.4%
    exact, well above the 1/16 of guessing);
  chance_exact / chance_answer / chance_loss: uniform guessing as the task defines it;
  any other floor_* level the task measures on the set (`Task.set_floors`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

from sleep_lm.model import sharding
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.sleep import sleep_forward
from sleep_lm.tasks import Task, eval_sets

Array = jax.Array


@functools.cache
def make_eval_step(model_cfg: ModelConfig, schedule: tuple[bool, ...] | None = None,
                   rules: sharding.Rules | None = None):
  """Jitted (params [S,...], batch [B,T]) -> (cross-entropy, hit) [S,B,T] float32 / bool.

  Call it under `jax.set_mesh(mesh)`. The outputs are replicated (`P()`): every process can
  read them (a batch-sharded output would span devices of other processes)."""
  def one(params, batch):
    out = sleep_forward(model_cfg, params, batch["inputs"], batch["loss_mask"], schedule=schedule)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch["targets"])
    return ce, jnp.argmax(out.logits, -1) == batch["targets"]

  def seeded(params, batch):
    with contextlib.nullcontext() if rules is None else nn.logical_axis_rules(rules):
      return jax.vmap(one, in_axes=(0, None))(params, batch)
  return jax.jit(seeded, out_shardings=PartitionSpec())


def floors(targets: np.ndarray, loss_mask: np.ndarray, answer_group: np.ndarray) -> dict:
  """Exact and per-answer accuracy of the majority-answer predictor on a set [n,T]."""
  mask = loss_mask > 0
  majority = np.zeros(targets.shape[1], targets.dtype)
  for p in np.flatnonzero(mask.any(0)):
    values, counts = np.unique(targets[mask[:, p], p], return_counts=True)
    majority[p] = values[np.argmax(counts)]
  hit = (targets == majority[None]) | ~mask
  return {"floor_exact": float(hit.all(1).mean()),
          "floor_answer": float(answer_accuracy(hit, mask, answer_group).mean())}


def answer_accuracy(hit: np.ndarray, mask: np.ndarray, answer_group: np.ndarray) -> np.ndarray:
  """[..., n, T] hits -> [..., G] accuracy of each answer group (all its tokens right)."""
  groups = int(answer_group.max()) + 1
  out = []
  for g in range(groups):
    member = answer_group == g                             # [n,T]
    present = member.any(-1)                               # [n]
    right = np.all(hit | ~(member & mask), axis=-1)        # [..., n]
    out.append((right * present).sum(-1) / max(present.sum(), 1))
  return np.stack(out, -1)


@dataclasses.dataclass(frozen=True)
class EvalSet:
  name: str
  source: object          # random-access TFDS source
  floors: dict


def prepare_eval_sets(task: Task, *, size: int, data_dir: str | Path,
                      names: Sequence[str] | None = None) -> list[EvalSet]:
  """Builds (once) and opens the task's eval sets and measures their floors."""
  sets = []
  for name in names or task.eval_set_names():
    source = eval_sets.eval_source(task, name, size=size, data_dir=str(data_dir))
    whole = next(eval_sets.eval_batches(source, len(source)))
    sets.append(EvalSet(name, source, {**floors(whole["targets"], whole["loss_mask"],
                                                whole["answer_group"]),
                                       **task.set_floors(name, whole),
                                       **{f"chance_{k.split('_')[0]}": v
                                          for k, v in task.chance(name).items()}}))
  return sets


def evaluate(model_cfg: ModelConfig, params, mesh, sets: Sequence[EvalSet], *, batch_size: int,
             schedule: tuple[bool, ...] | None = None,
             rules: sharding.Rules = sharding.DEFAULT_RULES) -> dict[str, dict]:
  """Metrics of every seed (params with a leading seed axis) on every set.

  Returns {set name: {"examples", "loss", "exact_accuracy", "answer_accuracy" (per group),
  "query_accuracy" (mean over groups): each a list over seeds, and the set's floors}}.
  """
  step = make_eval_step(model_cfg, schedule, rules)
  batch_sh = sharding.batch_sharding(mesh, rules)
  results = {}
  for es in sets:
    ce_sum, tokens, exact, answers, n_total = 0.0, 0.0, [], [], 0
    for batch in eval_sets.eval_batches(es.source, batch_size):
      n = len(batch["inputs"])
      padded = {k: np.pad(v, [(0, batch_size - n)] + [(0, 0)] * (v.ndim - 1))
                for k, v in batch.items() if k != "answer_group"}
      with jax.set_mesh(mesh):
        ce, hit = jax.device_get(step(params, jax.device_put(padded, batch_sh)))
      ce, hit = ce[:, :n], hit[:, :n]                                  # [S,n,T]
      mask = batch["loss_mask"] > 0
      ce_sum = ce_sum + (ce * mask).sum((1, 2))
      tokens += mask.sum()
      exact.append(np.all(hit | ~mask, -1))                            # [S,n]
      answers.append(answer_accuracy(hit, mask, batch["answer_group"]) * n)
      n_total += n
    answer_acc = np.sum(answers, 0) / n_total                          # [S,G]
    results[es.name] = {
        "examples": n_total,
        "loss": [float(x) for x in ce_sum / max(tokens, 1)],
        "exact_accuracy": [float(x) for x in np.concatenate(exact, 1).mean(1)],
        "answer_accuracy": [[float(a) for a in row] for row in answer_acc],
        "query_accuracy": [float(x) for x in answer_acc.mean(1)],
        **es.floors}
  return results


def per_seed_records(results: Mapping[str, dict], seeds: Sequence[int]) -> list[dict]:
  """Flattens `evaluate`'s results into one record per (set, seed) for metrics.jsonl."""
  records = []
  for name, r in results.items():
    shared = {k: v for k, v in r.items() if not isinstance(v, list)}
    for i, seed in enumerate(seeds):
      records.append({"set": name, "seed": seed, **shared,
                      **{k: v[i] for k, v in r.items() if isinstance(v, list)}})
  return records


def format_results(results: Mapping[str, dict], seeds: Sequence[int]) -> str:
  """A table: one row per set and seed, then the mean over seeds, with floor and chance."""
  lines = [f"{'set':<8}{'seed':>6}{'loss':>9}{'exact':>9}{'answers':>9}   per answer"]
  for name, r in results.items():
    for i, seed in enumerate(seeds):
      lines.append(f"{name:<8}{seed:>6}{r['loss'][i]:>9.4f}{r['exact_accuracy'][i]:>9.4f}"
                   f"{r['query_accuracy'][i]:>9.4f}   "
                   f"{[round(a, 3) for a in r['answer_accuracy'][i]]}")
    if len(seeds) > 1:
      spread = np.std(r["exact_accuracy"], ddof=1)
      lines.append(f"{name:<8}{'mean':>6}{np.mean(r['loss']):>9.4f}"
                   f"{np.mean(r['exact_accuracy']):>9.4f}{np.mean(r['query_accuracy']):>9.4f}"
                   f"   (exact: sd over seeds {spread:.4f})")
    lines.append(f"{name:<8}{'floor':>6}{'':>9}{r['floor_exact']:>9.4f}{r['floor_answer']:>9.4f}"
                 f"   majority answer at each position ({r['examples']} examples)")
    lines.append(f"{name:<8}{'chance':>6}{'':>9}{r['chance_exact']:>9.4f}"
                 f"{r['chance_answer']:>9.4f}   uniform guessing")
    extra = {k: v for k, v in r.items()
             if k.startswith("floor_") and k not in ("floor_exact", "floor_answer")}
    if extra:
      lines.append(f"{name:<8}{'floors':>6}   " + "  ".join(f"{k[6:]} {v:.4f}"
                                                         for k, v in extra.items()))
  return "\n".join(lines)
