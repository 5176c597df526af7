"""Prepares one dataset into ArrayRecord files, safely under interruption and reruns.

TFDS writes into `<config>/incomplete.XXXXXX_<version>/` and renames it to `<version>/`
only when every split is written, so a complete dataset is exactly one whose version
folder exists: it is reported and left untouched. Leftovers of an interrupted run are
removed before a new attempt; a lock file keeps two preparations of the same output
folder from running at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import tensorflow_datasets as tfds

from fada_jax.data import sources as sources_lib
from fada_jax.data.builders import layout, segmentation
from fada_jax.errors import UserError

_INCOMPLETE_PREFIX = "incomplete."


@dataclasses.dataclass
class PrepareResult:
  name: str
  num_classes: int
  path: Path
  already_complete: bool
  counts: dict[str, int]
  skipped: list[str]


@contextlib.contextmanager
def _output_lock(output_dir: Path) -> Iterator[None]:
  output_dir.mkdir(parents=True, exist_ok=True)
  lock_path = output_dir / ".prepare.lock"
  with open(lock_path, "a") as lock_file:
    try:
      fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise UserError(f"another preparation is writing to {output_dir} (lock {lock_path}); "
                      "wait for it to finish") from None
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove_leftovers(config_dir: Path) -> list[Path]:
  """Deletes the temporary folders of interrupted runs (only ever `incomplete.*`)."""
  removed = []
  if config_dir.is_dir():
    for path in config_dir.iterdir():
      if path.name.startswith(_INCOMPLETE_PREFIX) and path.is_dir():
        shutil.rmtree(path)
        removed.append(path)
  return removed


def read_counts(path: Path) -> dict[str, int]:
  """Examples per split of a complete prepared dataset (from its metadata)."""
  with open(path / "metadata.json") as f:
    metadata = json.load(f)
  return {split: len(metadata[split]["names"]) for split in metadata
          if isinstance(metadata[split], dict) and "names" in metadata[split]}


def prepare(name: str, data_root: str | os.PathLike, output_dir: str | os.PathLike,
            num_classes: int, workers: int = 1,
            pseudo_label_dir: str | os.PathLike | None = None,
            skip_corrupt: bool = False, progress: bool = True,
            image_size: tuple[int, int] | None = None,
            uncompressed_images: bool = False) -> PrepareResult:
  """Prepares `name` unless it is already complete; returns what was found or written.

  With `image_size` (width, height), the train split at that training size instead.
  `uncompressed_images` stores the images' pixels in uncompressed records (see prepare.py)."""
  if name != "cityscapes_pseudo":
    pseudo_label_dir = None  # Only the pseudo-labelled dataset reads that folder.
  output_dir = Path(output_dir).expanduser()
  data_root = Path(data_root).expanduser()
  path = layout.prepared_path(output_dir, name, num_classes, pseudo_label_dir, image_size)
  if path.is_dir():
    return PrepareResult(name, num_classes, path, True, read_counts(path), [])
  # Listing first gives a one-line error for a bad layout before anything is written.
  for split in layout.splits(name, image_size):
    sources_lib.make_source(name, data_root, split, num_classes, pseudo_label_dir=pseudo_label_dir)
  with _output_lock(output_dir):
    if path.is_dir():  # Finished by another process while we waited.
      return PrepareResult(name, num_classes, path, True, read_counts(path), [])
    _remove_leftovers(path.parent)
    builder = segmentation.make_builder(
        name, output_dir, num_classes, pseudo_label_dir, image_size, workers=workers,
        skip_corrupt=skip_corrupt, progress=progress, uncompressed_images=uncompressed_images)
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.fspath(data_root),
        try_download_gcs=False,
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
    )
    # TFDS wants a downloads folder even with nothing to download; keep it out of the way.
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".downloads.") as download_dir:
      with _tfds_quiet(), _record_options(_UNCOMPRESSED if uncompressed_images else None):
        builder.download_and_prepare(download_dir=download_dir, download_config=download_config)
  return PrepareResult(name, num_classes, path, False, read_counts(path), list(builder.skipped))


# TFDS writes ArrayRecord files with 'group_size:1' and array-record's default record
# compression. Reading a compressed 6 MB frame costs more than decoding it (measured: 11
# ms per record against 2.6 uncompressed), so uncompressed images go into uncompressed
# records. Readers need no option: each record says how it is stored.
_UNCOMPRESSED = "group_size:1,uncompressed"


@contextlib.contextmanager
def _record_options(options: str | None) -> Iterator[None]:
  """TFDS's ArrayRecord files written with `options` (None: TFDS's own) meanwhile."""
  if options is None:
    yield
    return
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import file_adapters  # pylint: disable=g-import-not-at-top
  file_format = file_adapters.FileFormat.ARRAY_RECORD
  adapter = file_adapters.ADAPTER_FOR_FORMAT[file_format]

  class Adapter(adapter):
    """The same adapter, writing its records with `options`."""

    @classmethod
    def write_examples(cls, path, iterator):
      writer = array_record_module.ArrayRecordWriter(os.fspath(path), options)
      for _, serialized_example in iterator:
        writer.write(serialized_example)
      writer.close()

  file_adapters.ADAPTER_FOR_FORMAT[file_format] = Adapter
  try:
    yield
  finally:
    file_adapters.ADAPTER_FOR_FORMAT[file_format] = adapter


@contextlib.contextmanager
def _tfds_quiet() -> Iterator[None]:
  """TFDS's own progress bars duplicate ours; silence them during generation."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  was_active = tqdm_utils._active  # pylint: disable=protected-access
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(was_active)
