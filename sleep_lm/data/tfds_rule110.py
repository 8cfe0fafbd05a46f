"""Fixed Rule 110 evaluation sets as a TFDS array_record dataset, written and read without TF.

Each config holds `size` examples of the *eval* stream (`Rule110Task(seed, t, split="eval")`,
indices 0 .. size-1, record i == example i: shuffling is disabled). Eval sets for different t
share the same contexts (the eval stream does not depend on t), so accuracies across t are paired.

TensorFlow is not needed here: TFDS (4.9.x) serialises `tfds.features.Tensor` features with its
own bundled tf.Example protos, writes array_record files, and `as_data_source()` decodes them with
the NumPy parser. Configs: `t{t}` for the default size/seed, `t{t}_n{size}_s{seed}` otherwise.

  source = eval_source(8, data_dir="/data/tfds")  # builds once, then reuses
  for batch in eval_batches(source, 512): ...     # numpy dicts, same keys as training
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from sleep_lm.data import rule110

EVAL_SIZE = 4096
EVAL_SEED = 0
DEFAULT_EVAL_TS = (0, 4, 8, 10, 12, 14, 16, 32)
SPLIT = "eval"
BATCH_KEYS = ("inputs", "targets", "loss_mask")
_GEN_CHUNK = 1024  # examples generated per vectorised call


def config_name(t: int, size: int = EVAL_SIZE, seed: int = EVAL_SEED) -> str:
  if size == EVAL_SIZE and seed == EVAL_SEED:
    return f"t{t}"
  return f"t{t}_n{size}_s{seed}"


@dataclasses.dataclass(kw_only=True)
class Rule110EvalConfig(tfds.core.BuilderConfig):
  """One evaluation set: `size` eval-stream examples for t steps under `seed`."""

  t: int = 0
  size: int = EVAL_SIZE
  seed: int = EVAL_SEED


def make_config(t: int, size: int = EVAL_SIZE, seed: int = EVAL_SEED) -> Rule110EvalConfig:
  rule110.Rule110Task(seed=seed, t=t, split="eval")  # validates seed and t
  size = rule110._check_int("size", size, 1)
  return Rule110EvalConfig(
      name=config_name(t, size, seed), t=t, size=size, seed=seed,
      description=f"Rule 110 eval set: t={t}, {size} examples, seed {seed}.")


class Rule110Eval(tfds.core.GeneratorBasedBuilder):
  """Rule 110 evaluation sets (see module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [make_config(t) for t in DEFAULT_EVAL_TS]
  # TFDS derives code_path via importlib_resources (not installed) for builders inside packages;
  # pin it to this file (only used to look for an absent checksums.tsv).
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: dataset_info_from_configs() wants a package dir with metadata files.
    seq = (rule110.SEQ_LEN,)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "inputs": tfds.features.Tensor(shape=seq, dtype=np.int32),
            "targets": tfds.features.Tensor(shape=seq, dtype=np.int32),
            "loss_mask": tfds.features.Tensor(shape=seq, dtype=np.float32),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        disable_shuffling=True,  # keep record i == eval example i
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self):
    cfg = self.builder_config
    task = rule110.Rule110Task(seed=cfg.seed, t=cfg.t, split="eval")
    for start in range(0, cfg.size, _GEN_CHUNK):
      idx = np.arange(start, min(start + _GEN_CHUNK, cfg.size), dtype=np.uint64)
      batch = task.batch(idx)
      for j, i in enumerate(idx.tolist()):
        yield i, {**{k: v[j] for k, v in batch.items()}, "index": i}


def eval_builder(t: int, *, data_dir: str, size: int = EVAL_SIZE,
                 seed: int = EVAL_SEED) -> Rule110Eval:
  """Builder for the eval set (t, size, seed) under data_dir; prepared if absent."""
  config = make_config(t, size, seed)
  # TFDS refuses a config object that shadows a registered name; pass the name for those.
  if config.name in Rule110Eval.builder_configs:
    config = config.name
  builder = Rule110Eval(config=config, data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False,  # generated locally, never fetched
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return builder


def eval_source(t: int, *, data_dir: str, size: int = EVAL_SIZE, seed: int = EVAL_SEED):
  """Random-access source (len + getitem -> dict of numpy arrays) of the eval set.

  Builds it under data_dir first if absent. Record i equals
  `Rule110Task(seed, t, split="eval").example(i)` plus an int64 "index" field. Usable directly
  with `grain.MapDataset.source(...)`.
  """
  return eval_builder(t, data_dir=data_dir, size=size, seed=seed).as_data_source(split=SPLIT)


def eval_batches(source, batch_size: int, *,
                 drop_remainder: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Yields the source in order as dicts of stacked numpy arrays (keys BATCH_KEYS).

  The last batch is short unless drop_remainder, so every example is scored exactly once.
  """
  batch_size = rule110._check_int("batch_size", batch_size, 1)
  n = len(source)
  stop = n - n % batch_size if drop_remainder else n
  for start in range(0, stop, batch_size):
    keys = range(start, min(start + batch_size, n))
    getitems = getattr(source, "__getitems__", None)
    records = getitems(list(keys)) if getitems else [source[i] for i in keys]
    yield {k: np.stack([r[k] for r in records]) for k in BATCH_KEYS}
