"""Random-access sources over datasets prepared by `tools/prepare_data.py` (ArrayRecord).

`make_prepared_source(name, root, split, num_classes)` returns a source with the folder
sources' interface: `__len__`, `__getitem__(i) -> {'image': uint8 [H, W, 3] RGB,
'label': uint8 [H, W] train ids (255 = ignore), 'name': str}`, plus the label-info table
(`classes_per_example()`, `class_presence()`) read from the dataset's metadata without
touching the images. Sources pickle cheaply: each process opens the files on first use.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from fada_jax.data import sources as sources_lib
from fada_jax.data.builders import layout
from fada_jax.errors import UserError


def default_prepared_dir(root: str | os.PathLike) -> Path:
  """Where `tools/prepare_data.py` writes by default: <data root>/prepared."""
  return Path(root).expanduser() / "prepared"


_NPY_MAGIC = b"\x93NUMPY"
_ZLIB_FIRST_BYTE = 0x78  # deflate with a 32 kB window: every zlib stream Python writes


def _read_npy(data: bytes) -> np.ndarray:
  return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def _decode_label(data: bytes, name: str) -> np.ndarray:
  try:
    if data[:1] == bytes([_ZLIB_FIRST_BYTE]):  # prepared with --uncompressed_images
      return _read_npy(zlib.decompress(data))
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image)
  except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as error:
    raise sources_lib.CorruptFileError(f"corrupt stored label of {name}: {error}") from None


def _decode_image(data: bytes, name: str) -> np.ndarray:
  try:
    if data[:len(_NPY_MAGIC)] == _NPY_MAGIC:  # prepared with --uncompressed_images
      return _read_npy(data)
    with Image.open(io.BytesIO(data)) as image:
      # convert() copies even when the mode is already RGB: skip it then.
      return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
  except (OSError, SyntaxError, ValueError, EOFError) as error:
    raise sources_lib.CorruptFileError(f"corrupt stored image of {name}: {error}") from None


class PreparedSource:
  """One split of a prepared dataset."""

  def __init__(self, path: str | os.PathLike, split: str):
    self.path = Path(path)
    self.split = split
    metadata_path = self.path / "metadata.json"
    remedy = "prepare the dataset again with tools/prepare_data.py"
    try:
      metadata = json.loads(metadata_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
      raise UserError(f"unreadable prepared-dataset metadata {metadata_path}: "
                      f"{type(error).__name__}: {error}; {remedy}") from None
    if not isinstance(metadata, dict):
      raise UserError(f"malformed prepared-dataset metadata {metadata_path}: not a JSON "
                      f"object; {remedy}")
    if split not in metadata:
      raise UserError(f"prepared dataset {self.path} has no split {split!r}")
    self.dataset = self.path.parent.parent.name
    try:
      self.num_classes = int(metadata["num_classes"])
      self.names: list[str] = [str(n) for n in metadata[split]["names"]]
      self._classes = [np.asarray(c, dtype=np.uint8) for c in metadata[split]["classes"]]
      self.skipped: list[str] = list(metadata[split].get("skipped", []))
    except KeyError as error:
      raise UserError(f"malformed prepared-dataset metadata {metadata_path}: no field "
                      f"{error}; {remedy}") from None
    except (TypeError, ValueError, AttributeError, OverflowError) as error:
      raise UserError(f"malformed prepared-dataset metadata {metadata_path}: "
                      f"{type(error).__name__}: {error}; {remedy}") from None
    # (width, height) of frames prepared at a training size; None: as published.
    size = metadata.get("image_size")
    self.image_size = tuple(int(v) for v in size) if size else None
    if len(self._classes) != len(self.names):
      raise UserError(f"malformed prepared-dataset metadata {metadata_path}: "
                      f"{len(self.names)} names but {len(self._classes)} class lists in "
                      f"split {split!r}; {remedy}")
    self._records = None  # Opened lazily, per process.

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_records"] = None
    return state

  def __len__(self) -> int:
    return len(self.names)

  def __repr__(self) -> str:
    return f"PreparedSource({self.path}, {self.split}, {len(self)} frames)"

  def _open(self):
    if self._records is None:
      # Imported here: TFDS is only needed by processes that read records.
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      builder = tfds.builder_from_directory(os.fspath(self.path))
      self._records = builder.as_data_source(split=self.split)
      if len(self._records) != len(self.names):
        raise UserError(f"prepared dataset {self.path} is inconsistent: {len(self._records)} "
                        f"records but {len(self.names)} names in metadata.json; prepare it again")
    return self._records

  def _decode(self, record: dict[str, Any]) -> dict[str, Any]:
    name = record["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return {"image": _decode_image(record["image"], name),
            "label": _decode_label(record["label"], name), "name": name}

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {self!r}")
    return self._decode(self._open()[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self._decode(r) for r in self._open().__getitems__([int(i) for i in indices])]

  def read_image(self, index: int) -> np.ndarray:
    """The image of frame `index` alone (as `self[index]['image']`), its label undecoded."""
    record = self._open()[int(index)]
    name = record["name"]
    return _decode_image(record["image"], name.decode() if isinstance(name, bytes) else str(name))

  def read_encoded(self, index: int) -> dict[str, Any]:
    """The stored record undecoded: image and label PNG bytes, name, classes."""
    return self._open()[int(index)]

  def classes_per_example(self) -> list[np.ndarray]:
    """Per frame, the sorted train ids it contains (uint8): the label-info table."""
    return [c.copy() for c in self._classes]

  def class_presence(self, progress: bool = False) -> np.ndarray:
    """bool [N, K]: which classes each frame holds (as `FolderSource.class_presence`)."""
    del progress  # Stored at preparation: nothing to compute.
    table = np.zeros((len(self), self.num_classes), dtype=bool)
    for row, classes in zip(table, self._classes):
      row[classes] = True
    return table


def resized_source_if_prepared(name: str, root: str | os.PathLike, num_classes: int,
                               image_size: tuple[int, int]) -> PreparedSource | None:
  """The train split of `name` prepared at `image_size` (width, height), None if it is not."""
  if name not in layout.RESIZABLE:
    return None
  path = layout.prepared_path(default_prepared_dir(root), name, num_classes,
                              image_size=tuple(image_size))
  return PreparedSource(path, "train") if (path / "metadata.json").is_file() else None


def make_prepared_source(name: str, root: str | os.PathLike, split: str, num_classes: int, *,
                         pseudo_label_dir: str | os.PathLike | None = None,
                         prepared_dir: str | os.PathLike | None = None) -> PreparedSource:
  """The prepared `split` of dataset `name` under `prepared_dir` (default <root>/prepared)."""
  layout.check_split(name, split)
  output_dir = Path(prepared_dir).expanduser() if prepared_dir else default_prepared_dir(root)
  path = layout.prepared_path(output_dir, name, num_classes, pseudo_label_dir)
  if not (path / "metadata.json").is_file():
    command = (f"python tools/prepare_data.py --data_root={root} --datasets={name} "
               f"--num_classes={num_classes}")
    if prepared_dir:
      command += f" --output={prepared_dir}"
    if pseudo_label_dir:
      command += f" --pseudo_label_dir={pseudo_label_dir}"
    raise UserError(f"{name} ({num_classes} classes) is not prepared: {path} does not exist; "
                    f"run `{command}`")
  return PreparedSource(path, split)
