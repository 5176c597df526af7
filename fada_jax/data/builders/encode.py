"""Per-frame work of the preparation: check the image, read and map the label, encode.

Frames are listed and labels decoded by the folder sources (`fada_jax.data.sources`), so a
prepared dataset holds what a folder source reads. Runs in worker processes, so it imports
only numpy, PIL and the data modules (no TFDS).
"""

from __future__ import annotations

import io
import zlib
from typing import Any

import numpy as np
from PIL import Image

from fada_jax.data import sources as sources_lib
from fada_jax.errors import UserError


def image_size(path: str, data: bytes) -> tuple[int, int]:
  """(width, height) of an encoded image, checked for corruption without a full decode."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      size = image.size
      image.verify()  # Chunk CRCs and structure.
    return size
  except (OSError, SyntaxError, ValueError) as error:
    raise sources_lib.CorruptFileError(f"corrupt or truncated image file {path}: {error}") from None


def encode_png(array: np.ndarray) -> bytes:
  """A lossless PNG of uint8 [H, W] (grey) or [H, W, 3] (RGB)."""
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array, np.uint8)).save(
      buffer, format="PNG", compress_level=6)
  return buffer.getvalue()


def encode_raw(array: np.ndarray) -> bytes:
  """uint8 pixels as an NPY file: no compression, decoded by a copy."""
  buffer = io.BytesIO()
  np.save(buffer, np.ascontiguousarray(array, np.uint8), allow_pickle=False)
  return buffer.getvalue()


def encode_label_raw(train_ids: np.ndarray) -> bytes:
  """A label map as NPY compressed with zlib level 1: label maps are large flat regions,
  so a GTA5 label takes tens of kB and decodes in about 1 ms, against 6-9 ms for a PNG."""
  return zlib.compress(encode_raw(train_ids), 1)


def encode_label(train_ids: np.ndarray, uncompressed: bool) -> bytes:
  """A label as stored: a PNG, or with `uncompressed` (images) the fast form above."""
  return encode_label_raw(train_ids) if uncompressed else encode_png(train_ids)


def present_classes(train_ids: np.ndarray, num_classes: int) -> np.ndarray:
  """The sorted train ids (< num_classes) that occur in a label map, as uint8."""
  counts = np.bincount(train_ids.ravel(), minlength=256)
  return np.flatnonzero(counts[:num_classes]).astype(np.uint8)


def encode_resized_example(source: sources_lib.FolderSource, index: int,
                           size: tuple[int, int], uncompressed: bool = False
                           ) -> dict[str, Any]:
  """Frame `index` at a training size (width, height): what the stages-1-2 transform
  makes of it before any colour jitter, bicubic image and nearest label (the same PIL
  calls), stored losslessly. `classes` are those of the full-size label, so the
  class-balanced sampler draws the same files as from the full-size dataset."""
  from fada_jax.data import transforms  # pylint: disable=g-import-not-at-top
  example = source[index]
  image = transforms.resize_image(example["image"], size)
  return {"image": encode_raw(image) if uncompressed else encode_png(image),
          "label": encode_label(transforms.resize_label(example["label"], size), uncompressed),
          "name": example["name"],
          "classes": present_classes(example["label"], source.num_classes)}


def encode_example(source: sources_lib.FolderSource, index: int,
                   size: tuple[int, int] | None = None,
                   uncompressed: bool = False) -> dict[str, Any]:
  """The stored record of frame `index` of a folder source (at `size` if given): the
  image file's own bytes and a PNG label, or with `uncompressed` its RGB pixels (NPY) and
  the label as `encode_label_raw`."""
  if size is not None:
    return encode_resized_example(source, index, size, uncompressed)
  image_path = source.image_paths[index]
  try:
    with open(image_path, "rb") as f:
      image_bytes = f.read()
  except FileNotFoundError:
    raise UserError(f"image file missing: {image_path}") from None
  width, height = image_size(image_path, image_bytes)
  train_ids = source.read_label(index)
  if train_ids.shape != (height, width):
    # As the folder source does: a few GTA5 labels differ in size from their image.
    train_ids = np.asarray(Image.fromarray(train_ids).resize((width, height), Image.NEAREST))
  if uncompressed:
    image_bytes = encode_raw(sources_lib.read_image(image_path))
  return {"image": image_bytes, "label": encode_label(train_ids, uncompressed),
          "name": source.names[index],
          "classes": present_classes(train_ids, source.num_classes)}


_worker_source: sources_lib.FolderSource | None = None
_worker_size: tuple[int, int] | None = None
_worker_uncompressed = False


def init_worker(source: sources_lib.FolderSource, size: tuple[int, int] | None = None,
                uncompressed: bool = False) -> None:
  global _worker_source, _worker_size, _worker_uncompressed
  _worker_source, _worker_size, _worker_uncompressed = source, size, uncompressed


def encode_in_worker(args: tuple[int, bool]) -> tuple[int, dict[str, Any] | str]:
  """(index, record) or, for a corrupt frame when skipping those, (index, error message)."""
  index, skip_corrupt = args
  try:
    return index, encode_example(_worker_source, index, _worker_size, _worker_uncompressed)
  except sources_lib.CorruptFileError as error:
    if not skip_corrupt:
      raise
    return index, str(error)
