"""Where each dataset's files are (the release's folder layouts) and where they are prepared.

Light on purpose (no TFDS import): the preparation tool, the encode workers and
`fada_jax.data.prepared` all use it.

Folder layouts under a data root:
  gta5/images/<stem>.png, gta5/labels/<stem>.png (8-bit Cityscapes label ids)
  synthia/RAND_CITYSCAPES/RGB/<stem>.png, synthia/RAND_CITYSCAPES/GT/LABELS/<stem>.png
    (16-bit, 2+ channels, SYNTHIA class id in channel 0)
  cityscapes/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png,
  cityscapes/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png
  pseudo labels (stage 3): <pseudo_label_dir>/<city>/<stem>.png (pixel value = train id)
Listing and label decoding are those of the folder sources (`fada_jax.data.sources`), so a
prepared dataset holds exactly the frames, order, names and labels a folder source reads.
Prepared data: <output>/<dataset>/<config>/<VERSION>/ with config `classes19` or
`classes16` (`classes19_<hash of the pseudo-label folder>` for cityscapes_pseudo;
`classes19_<W>x<H>` for a train split prepared at a training size).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fada_jax.errors import UserError

VERSION = "1.0.0"

# The splits each builder prepares.
DATASET_SPLITS: dict[str, tuple[str, ...]] = {
    "gta5": ("train",),
    "synthia": ("train",),
    "cityscapes": ("train", "val"),
    "cityscapes_pseudo": ("train",),
}


def check_dataset(name: str) -> None:
  if name not in DATASET_SPLITS:
    raise UserError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_SPLITS)}")


def check_split(name: str, split: str) -> None:
  check_dataset(name)
  if split not in DATASET_SPLITS[name]:
    raise UserError(f"dataset {name!r} has no split {split!r}; it has "
                    f"{', '.join(DATASET_SPLITS[name])}")


def pseudo_label_tag(pseudo_label_dir: str | os.PathLike) -> str:
  """A short stable tag of a pseudo-label folder (its resolved path)."""
  resolved = str(Path(pseudo_label_dir).expanduser().resolve())
  return hashlib.sha1(resolved.encode()).hexdigest()[:8]


# Datasets that can also be prepared at a training size, and the split that is: the
# streams that resize whole frames to a fixed size (stages 1-2) read only their train split.
RESIZABLE = ("gta5", "synthia", "cityscapes")
RESIZED_SPLITS = ("train",)


def size_tag(image_size: tuple[int, int] | None) -> str:
  return "" if image_size is None else f"_{int(image_size[0])}x{int(image_size[1])}"


def config_name(name: str, num_classes: int,
                pseudo_label_dir: str | os.PathLike | None = None,
                image_size: tuple[int, int] | None = None) -> str:
  """The builder config name of a dataset in the 19- or 16-class setting (and at a
  training size (width, height): `classes19_1280x720`)."""
  if num_classes not in (16, 19):
    raise UserError(f"num_classes must be 16 or 19, got {num_classes!r}")
  base = f"classes{num_classes}"
  if image_size is not None:
    if name not in RESIZABLE:
      raise UserError(f"{name} is not prepared at a training size; only "
                      f"{', '.join(RESIZABLE)} are")
    return base + size_tag(image_size)
  if name == "cityscapes_pseudo":
    if not pseudo_label_dir:
      raise UserError("cityscapes_pseudo needs a pseudo-label folder "
                      "(--pseudo_label_dir / config.data.pseudo_label_dir)")
    return f"{base}_{pseudo_label_tag(pseudo_label_dir)}"
  return base


def prepared_path(output_dir: str | os.PathLike, name: str, num_classes: int,
                  pseudo_label_dir: str | os.PathLike | None = None,
                  image_size: tuple[int, int] | None = None) -> Path:
  """The directory holding a complete prepared dataset (exists only when complete)."""
  check_dataset(name)
  return Path(output_dir) / name / config_name(name, num_classes, pseudo_label_dir,
                                               image_size) / VERSION


def splits(name: str, image_size: tuple[int, int] | None = None) -> tuple[str, ...]:
  """The splits prepared of a dataset (at a training size: the train split)."""
  return RESIZED_SPLITS if image_size is not None else DATASET_SPLITS[name]
