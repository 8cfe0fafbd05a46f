"""Held-out sets of any task as a TFDS array_record dataset, written and read without TensorFlow.

One builder, `SleepLmEval`, serves every task: a config names the task (registry name and its
fields, as JSON), the eval set and the number of examples; record i is
`task.eval_examples(set, [i])` plus an int64 "index" (shuffling is disabled), so the files hold
exactly what the generator gives. TensorFlow is not needed: TFDS (4.9.x) serialises
`tfds.features.Tensor` features with its bundled tf.Example protos, writes array_record files,
and `as_data_source()` decodes them with the NumPy parser.

  source = eval_source(task, "t12", size=4096, data_dir="/data/tfds")  # builds once, then reuses
  for batch in eval_batches(source, 512): ...     # numpy dicts with the keys of BATCH_KEYS
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from sleep_lm.common import files
from sleep_lm.common.validation import check_int
from sleep_lm.tasks.base import BATCH_KEYS, Task

SPLIT = "eval"
_GEN_CHUNK = 1024  # examples generated per vectorised call


@dataclasses.dataclass(kw_only=True)
class EvalSetConfig(tfds.core.BuilderConfig):
  """One held-out set: `size` examples of `task.eval_examples(eval_set, ...)`."""

  task_name: str = ""
  task_fields: str = "{}"   # JSON of the task's dataclass fields
  eval_set: str = ""
  size: int = 0
  seq_len: int = 0


def make_config(task: Task, eval_set: str, size: int) -> EvalSetConfig:
  size = check_int("eval_size", size, 1)
  return EvalSetConfig(
      name=f"{task.eval_set_id(eval_set)}_n{size}", task_name=task.name,
      task_fields=json.dumps(task.fields(), sort_keys=True), eval_set=eval_set, size=size,
      seq_len=task.seq_len, description=f"{task.name} eval set {eval_set}: {size} examples.")


class SleepLmEval(tfds.core.GeneratorBasedBuilder):
  """Held-out sets of the sleep_lm tasks (see module docstring)."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"2.0.0": "One builder for every task; answer_group feature."}
  # TFDS derives code_path via importlib_resources (not installed) for builders inside packages;
  # pin it to this file (only used to look for an absent checksums.tsv).
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: dataset_info_from_configs() wants a package dir with metadata files.
    seq = (self.builder_config.seq_len,)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "inputs": tfds.features.Tensor(shape=seq, dtype=np.int32),
            "targets": tfds.features.Tensor(shape=seq, dtype=np.int32),
            "loss_mask": tfds.features.Tensor(shape=seq, dtype=np.float32),
            "answer_group": tfds.features.Tensor(shape=seq, dtype=np.int32),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        disable_shuffling=True,  # keep record i == eval example i
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self):
    from sleep_lm.tasks import make_task  # the registry imports every task module
    cfg = self.builder_config
    task = make_task({"name": cfg.task_name, **json.loads(cfg.task_fields)})
    for start in range(0, cfg.size, _GEN_CHUNK):
      idx = np.arange(start, min(start + _GEN_CHUNK, cfg.size), dtype=np.uint64)
      batch = task.eval_examples(cfg.eval_set, idx)
      for j, i in enumerate(idx.tolist()):
        yield i, {**{k: batch[k][j] for k in BATCH_KEYS}, "index": i}


def eval_source(task: Task, eval_set: str, *, size: int, data_dir: str):
  """Random-access source (len + getitem -> dict of numpy arrays) of a task's eval set.

  Builds it under data_dir first if absent. Record i equals `task.eval_examples(eval_set, [i])`
  plus an int64 "index" field. Usable directly with `grain.MapDataset.source(...)`.
  """
  tfds.disable_progress_bar()
  config = make_config(task, eval_set, size)
  _check_metadata(Path(data_dir) / SleepLmEval.name / config.name / str(SleepLmEval.VERSION))

  def builder():
    return SleepLmEval(config=config, data_dir=str(data_dir), file_format="array_record")

  prepared = builder()
  try:
    prepared.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False,  # generated locally, never fetched
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  except FileExistsError:
    # Another process (a parallel sweep) finished the same set first: TFDS writes into a
    # temporary folder and renames it, so the set it left is whole. Open that one.
    prepared = builder()
    if not prepared.is_prepared():
      raise
  return prepared.as_data_source(split=SPLIT)


def _check_metadata(directory: Path) -> None:
  """The metadata of a set built before, read through `sleep_lm.common.files`: a damaged file
  (a crash or a full disk while TFDS wrote it) is one line naming it, where TFDS would raise a
  protobuf traceback. The set's records themselves are trusted."""
  path = directory / "dataset_info.json"
  if path.exists():
    files.read_json(path, fields=("name", "splits"), fix=f"delete {directory} to rebuild the set")


def eval_batches(source, batch_size: int, *,
                 drop_remainder: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Yields the source in order as dicts of stacked numpy arrays (keys BATCH_KEYS).

  The last batch is short unless drop_remainder, so every example is scored exactly once.
  """
  batch_size = check_int("eval_batch_size", batch_size, 1)
  n = len(source)
  stop = n - n % batch_size if drop_remainder else n
  for start in range(0, stop, batch_size):
    keys = range(start, min(start + batch_size, n))
    getitems = getattr(source, "__getitems__", None)
    records = getitems(list(keys)) if getitems else [source[i] for i in keys]
    yield {k: np.stack([r[k] for r in records]) for k in BATCH_KEYS}
