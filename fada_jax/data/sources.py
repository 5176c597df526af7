"""Random-access sources over the datasets' own folder layouts (no preparation step).

A source has `__len__` and `__getitem__(i) -> {'image': uint8 [H, W, 3] RGB,
'label': uint8 [H, W] train ids (255 = ignore), 'name': str}` and `class_presence()`, the
label-info table of class-balanced sampling (bool [N, K]: which classes each file holds).

Layouts under the data root (those of the published release):
  gta5/images/*.png, gta5/labels/*.png                      (8-bit Cityscapes label ids)
  synthia/RAND_CITYSCAPES/RGB/*.png, .../GT/LABELS/*.png     (16-bit, class id in channel 0)
  cityscapes/leftImg8bit/<split>/<city>/*_leftImg8bit.png
  cityscapes/gtFine/<split>/<city>/*_gtFine_labelIds.png
  cityscapes_pseudo: Cityscapes train images + <pseudo_label_dir>/<city>/<stem>.png
                     (pixel value = train id, as written by pseudo-labelling)
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fada_jax.data import labels as labels_lib
from fada_jax.errors import UserError

# GTA5 frames are 1914x1052 RGB: far below this, which only guards against malicious files.
Image.MAX_IMAGE_PIXELS = 1 << 28

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CACHE_DIR = Path(os.environ.get("FADA_JAX_CACHE", Path.home() / ".cache" / "fada_jax"))

SOURCE_NAMES = ("gta5", "synthia", "cityscapes", "cityscapes_pseudo")

_LAYOUTS = {
    "gta5": "gta5/images/*.png with matching gta5/labels/*.png",
    "synthia": ("synthia/RAND_CITYSCAPES/RGB/*.png with matching "
                "synthia/RAND_CITYSCAPES/GT/LABELS/*.png"),
    "cityscapes": ("cityscapes/leftImg8bit/<split>/<city>/*_leftImg8bit.png with matching "
                   "cityscapes/gtFine/<split>/<city>/*_gtFine_labelIds.png"),
    "cityscapes_pseudo": ("cityscapes/leftImg8bit/train/<city>/*_leftImg8bit.png with "
                          "matching <pseudo_label_dir>/<city>/<stem>.png"),
}

_log = logging.getLogger(__name__)


class CorruptFileError(UserError):
  """An image or label file that cannot be decoded."""


# ----------------------------------------------------------------------------- decoding


def read_image(path: str | os.PathLike) -> np.ndarray:
  """Decodes an image file to uint8 [H, W, 3] RGB; a corrupt file raises CorruptFileError."""
  try:
    with Image.open(path) as image:
      image.draft("RGB", image.size)  # JPEG only: decode straight to RGB, no scaling.
      # convert() copies even when the mode is already RGB: skip it then.
      rgb = image if image.mode == "RGB" else image.convert("RGB")
      return np.asarray(rgb)
  except FileNotFoundError as e:
    raise UserError(f"image file missing: {path}") from e
  except (OSError, ValueError, SyntaxError, struct.error, zlib.error) as e:
    raise CorruptFileError(f"corrupt or truncated image file {path}: {e}") from e


def _png_header(path: str | os.PathLike) -> tuple[int, int] | None:
  """(bit depth, colour type) of a PNG file, None if not a PNG."""
  with open(path, "rb") as f:
    head = f.read(29)
  if len(head) < 29 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
    return None
  return head[24], head[25]


def _with_rawmode(tile, rawmode: str):
  """A copy of a Pillow decoder tile reading its bytes with another raw mode."""
  if isinstance(tile.args, str):
    return tile._replace(args=rawmode)
  return tile._replace(args=(rawmode,) + tuple(tile.args[1:]))


def read_png_16bit(path: str | os.PathLike) -> np.ndarray:
  """Decodes a 16-bit PNG to uint16 [H, W] (grey) or [H, W, C].

  Pillow reads 16-bit grey exactly, but keeps only the high byte of each sample of 16-bit
  RGB/RGBA/grey+alpha images. Its decoder still does the zlib inflation and scanline
  unfiltering; we decode twice, once with the big-endian unpacker (high bytes) and once
  with the little-endian one on the same byte stream (which then yields the low bytes),
  and recombine. Grey+alpha has no such unpacker pair, so its 4-byte pixels are read as
  one big-endian 32-bit integer.
  """
  with Image.open(path) as image:
    tile = image.tile[0] if image.tile else None
    rawmode = None if tile is None else (
        tile.args if isinstance(tile.args, str) else tile.args[0])
    if image.mode == "I;16":
      return np.asarray(image).astype(np.uint16)
    if rawmode in ("RGB;16B", "RGBA;16B"):
      high = np.asarray(image).astype(np.uint16)
      with Image.open(path) as image_low:
        image_low.tile = [_with_rawmode(image_low.tile[0], rawmode.replace("16B", "16L"))]
        low = np.asarray(image_low).astype(np.uint16)
      return (high << 8) | low
    if rawmode == "LA;16B":
      # 4 bytes a pixel, as 8-bit RGBA: the bytes come out as (L high, L low, A high, A low).
      image.tile = [_with_rawmode(tile, "RGBA")]
      quad = np.asarray(image).astype(np.uint16)
      return np.stack([(quad[..., 0] << 8) | quad[..., 1], (quad[..., 2] << 8) | quad[..., 3]],
                      axis=-1)
  raise ValueError(f"not a 16-bit PNG (raw mode {rawmode})")


def read_label_ids(path: str | os.PathLike) -> np.ndarray:
  """Decodes a label file to its raw ids: uint8 [H, W] or uint16 [H, W] (channel 0)."""
  try:
    header = _png_header(path)
    if header is not None and header[0] == 16:
      ids = read_png_16bit(path)
      return ids[..., 0] if ids.ndim == 3 else ids
    with Image.open(path) as image:
      # Palette images (GTA5 labels, pseudo labels): the palette indices are the ids.
      if image.mode not in ("L", "P"):
        image = image.convert("RGB")
        return np.asarray(image)[..., 0]
      return np.asarray(image)
  except FileNotFoundError as e:
    raise UserError(f"label file missing: {path}") from e
  except (OSError, ValueError, SyntaxError, struct.error, zlib.error) as e:
    raise CorruptFileError(f"corrupt or truncated label file {path}: {e}") from e


def _resize_nearest(label: np.ndarray, height: int, width: int) -> np.ndarray:
  return np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))


# ----------------------------------------------------------------------------- listing


def _list_png(folder: Path, dataset: str, suffix: str = ".png") -> list[Path]:
  if not folder.is_dir():
    raise UserError(f"{dataset}: folder {folder} does not exist; expected layout: "
                    f"{_LAYOUTS[dataset]}")
  files = sorted(p for p in folder.iterdir() if p.name.endswith(suffix))
  if not files:
    raise UserError(f"{dataset}: folder {folder} holds no *{suffix} files; expected layout: "
                    f"{_LAYOUTS[dataset]}")
  return files


def _pair_by_key(dataset: str, images: dict[str, Path], label_files: dict[str, Path],
                 image_dir: Path, label_dir: Path) -> list[tuple[str, Path, Path]]:
  """Pairs images with labels by name; a file without its partner is an error."""
  missing_label = sorted(set(images) - set(label_files))
  if missing_label:
    raise UserError(f"{dataset}: image {images[missing_label[0]]} has no label in {label_dir} "
                    f"({len(missing_label)} image(s) without a label)")
  missing_image = sorted(set(label_files) - set(images))
  if missing_image:
    raise UserError(f"{dataset}: label {label_files[missing_image[0]]} has no image in "
                    f"{image_dir} ({len(missing_image)} label(s) without an image)")
  return [(key, images[key], label_files[key]) for key in sorted(images)]


def _flat_pairs(dataset: str, image_dir: Path, label_dir: Path):
  images = {p.stem: p for p in _list_png(image_dir, dataset)}
  label_files = {p.stem: p for p in _list_png(label_dir, dataset)}
  return _pair_by_key(dataset, images, label_files, image_dir, label_dir)


def _cityscapes_images(root: Path, split: str, dataset: str) -> dict[str, Path]:
  image_root = root / "cityscapes" / "leftImg8bit" / split
  if not image_root.is_dir():
    raise UserError(f"{dataset}: folder {image_root} does not exist; expected layout: "
                    f"{_LAYOUTS[dataset]}")
  suffix = "_leftImg8bit.png"
  images = {}
  for city in sorted(p for p in image_root.iterdir() if p.is_dir()):
    for p in city.iterdir():
      if p.name.endswith(suffix):
        images[f"{city.name}/{p.name[:-len(suffix)]}"] = p
  if not images:
    raise UserError(f"{dataset}: folder {image_root} holds no <city>/*{suffix} files; "
                    f"expected layout: {_LAYOUTS[dataset]}")
  return images


def _city_files(label_root: Path, suffix: str, dataset: str) -> dict[str, Path]:
  if not label_root.is_dir():
    raise UserError(f"{dataset}: folder {label_root} does not exist; expected layout: "
                    f"{_LAYOUTS[dataset]}")
  files = {}
  for city in sorted(p for p in label_root.iterdir() if p.is_dir()):
    for p in city.iterdir():
      if p.name.endswith(suffix):
        files[f"{city.name}/{p.name[:-len(suffix)]}"] = p
  return files


# ----------------------------------------------------------------------------- sources


class FolderSource:
  """Image/label pairs of one dataset split read straight from its folders."""

  def __init__(self, dataset: str, entries: Sequence[tuple[str, Path, Path]],
               lut: np.ndarray | None, num_classes: int, cache_folder: Path,
               skip_corrupt: bool = False):
    self.dataset = dataset
    self.num_classes = num_classes
    self.names = [e[0] for e in entries]
    self.image_paths = [str(e[1]) for e in entries]
    self.label_paths = [str(e[2]) for e in entries]
    # None: the label files hold train ids already (pseudo labels).
    self._lut = lut
    self._cache_folder = Path(cache_folder)
    self.skip_corrupt = skip_corrupt
    self.skipped: set[int] = set()

  def __len__(self) -> int:
    return len(self.names)

  def __repr__(self) -> str:
    return f"FolderSource({self.dataset}, {len(self)} files)"

  def read_label(self, index: int) -> np.ndarray:
    """Train ids uint8 [H, W] of file `index`."""
    ids = read_label_ids(self.label_paths[index])
    if self._lut is None:
      return np.ascontiguousarray(ids, dtype=np.uint8) if ids.dtype == np.uint8 else (
          labels_lib.map_labels(ids, np.arange(256, dtype=np.uint8)))
    return labels_lib.map_labels(ids, self._lut)

  def read_image(self, index: int) -> np.ndarray:
    """The image of file `index` alone (as `self[index]['image']`), its label unread."""
    if self.skip_corrupt:  # A corrupt file's replacement is decided by reading both.
      return self[index]["image"]
    return read_image(self.image_paths[int(index)])

  def _load(self, index: int) -> dict[str, Any]:
    image = read_image(self.image_paths[index])
    label = self.read_label(index)
    if label.shape != image.shape[:2]:
      # A few GTA5 frames have labels of another size; the release resized both
      # independently to the training size, which is what aligning them here amounts to.
      label = _resize_nearest(label, image.shape[0], image.shape[1])
    return {"image": image, "label": label, "name": self.names[index]}

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {self!r}")
    if not self.skip_corrupt:
      return self._load(index)
    # Skipping: a corrupt file is replaced by the next readable one, deterministically.
    for offset in range(len(self)):
      candidate = (index + offset) % len(self)
      if candidate in self.skipped:
        continue
      try:
        return self._load(candidate)
      except CorruptFileError as e:
        self.skipped.add(candidate)
        _log.warning("skipping %s (%d corrupt file(s) skipped so far in this process)", e,
                     len(self.skipped))
    raise UserError(f"{self.dataset}: every file is corrupt ({len(self)} skipped)")

  # --------------------------------------------------------------- label-info table

  def _label_info_key(self) -> str:
    digest = hashlib.sha1()
    digest.update(f"{self.dataset}:{self.num_classes}\n".encode())
    for path in self.label_paths:
      digest.update(path.encode())
      digest.update(b"\n")
    return digest.hexdigest()[:20]

  def _presence_of(self, index: int) -> np.ndarray:
    try:
      label = self.read_label(index)
    except CorruptFileError:
      if not self.skip_corrupt:
        raise
      _log.warning("label-info table: skipping corrupt label %s", self.label_paths[index])
      return np.zeros((self.num_classes,), bool)
    counts = np.bincount(label.ravel(), minlength=256)
    return counts[:self.num_classes] > 0

  def class_presence(self, progress: bool = True) -> np.ndarray:
    """bool [N, K]: classes present in each file, cached beside the data (or user cache)."""
    filename = f".fada_jax_label_info_{self._label_info_key()}.npy"
    candidates = [self._cache_folder / filename, _CACHE_DIR / filename]
    for path in candidates:
      if path.is_file():
        try:
          table = np.load(path)
          if table.shape == (len(self), self.num_classes) and table.dtype == bool:
            return table
        except (OSError, ValueError):
          pass  # A damaged cache file is simply recomputed.
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    table = np.zeros((len(self), self.num_classes), dtype=bool)
    workers = min(32, (os.cpu_count() or 1) + 4)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      rows = pool.map(self._presence_of, range(len(self)))
      for i, row in enumerate(tqdm(rows, total=len(self), disable=not progress,
                                   desc=f"label-info table of {self.dataset}")):
        table[i] = row
    for path in candidates:
      try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")
        np.save(temporary, table)
        os.replace(temporary, path)
        break
      except OSError:
        continue  # Read-only data folder: fall back to the user cache.
    return table


def make_source(name: str, root: str | os.PathLike, split: str, num_classes: int, *,
                pseudo_label_dir: str | os.PathLike | None = None,
                skip_corrupt: bool = False) -> FolderSource:
  """Random-access source of a dataset split in its release folder layout under `root`."""
  root = Path(os.path.expanduser(str(root)))
  if not root.is_dir():
    layout = _LAYOUTS.get(name, "")
    raise UserError(f"data root {root} does not exist; expected it to hold {layout}")
  if name == "gta5":
    entries = _flat_pairs(name, root / "gta5" / "images", root / "gta5" / "labels")
    return FolderSource(name, entries, labels_lib.label_lookup("gta5", num_classes),
                        num_classes, root / "gta5", skip_corrupt)
  if name == "synthia":
    base = root / "synthia" / "RAND_CITYSCAPES"
    entries = _flat_pairs(name, base / "RGB", base / "GT" / "LABELS")
    return FolderSource(name, entries, labels_lib.label_lookup("synthia", num_classes),
                        num_classes, root / "synthia", skip_corrupt)
  if name == "cityscapes":
    images = _cityscapes_images(root, split, name)
    label_dir = root / "cityscapes" / "gtFine" / split
    label_files = _city_files(label_dir, "_gtFine_labelIds.png", name)
    entries = _pair_by_key(name, images, label_files, images[next(iter(images))].parent.parent,
                           label_dir)
    return FolderSource(name, entries, labels_lib.label_lookup("cityscapes", num_classes),
                        num_classes, root / "cityscapes", skip_corrupt)
  if name == "cityscapes_pseudo":
    if not pseudo_label_dir:
      raise UserError("cityscapes_pseudo needs config.data.pseudo_label_dir (the folder of "
                      "pseudo labels written by pseudo-labelling)")
    pseudo_dir = Path(os.path.expanduser(str(pseudo_label_dir)))
    images = _cityscapes_images(root, split, name)
    label_files = _city_files(pseudo_dir, ".png", name)
    missing = sorted(set(images) - set(label_files))
    if missing:
      raise UserError(f"cityscapes_pseudo: image {images[missing[0]]} has no pseudo label "
                      f"{pseudo_dir / (missing[0] + '.png')} ({len(missing)} missing)")
    # Extra pseudo labels (e.g. of another split) are not an error: only images are read.
    entries = [(key, images[key], label_files[key]) for key in sorted(images)]
    return FolderSource(name, entries, None, num_classes, pseudo_dir, skip_corrupt)
  raise UserError(f"unknown folder dataset {name!r}; expected one of {', '.join(SOURCE_NAMES)}")
