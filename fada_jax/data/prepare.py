"""Prepares GTA5, SYNTHIA, Cityscapes (and pseudo-labelled Cityscapes) as ArrayRecord files.

Usage (`tools/prepare_data.py` is this module's command line):
  python tools/prepare_data.py --data_root=ROOT [--datasets=gta5,synthia,cityscapes]
      [--num_classes=19] [--workers=N] [--output=DIR] [--pseudo_label_dir=DIR]
      [--skip_corrupt] [--at_training_size] [--uncompressed_images]

ROOT holds the release's folder layouts (gta5/, synthia/, cityscapes/; see README). Each
dataset is written under DIR (default ROOT/prepared) as <dataset>/<config>/1.0.0/, with
labels mapped to train ids and the classes present in each frame (the class-balanced
sampler's table). Defaults: every dataset found under ROOT, in its settings: GTA5 19 classes,
SYNTHIA 16, Cityscapes 19 and 16; with --pseudo_label_dir also cityscapes_pseudo (19 classes
unless --num_classes says otherwise). Train with `config.data.format='array_record'`.

--at_training_size also writes each train split at its stage-2 training size (config
`classes<K>_<W>x<H>`: images bicubic, labels nearest, as the training transform resizes
them, stored as lossless PNGs; the classes per frame of the full-size labels). The
streams that resize whole frames to that size read it instead when it gives the same
batches: the target stream, and the source stream when no colour jitter comes before
the resize (stage 1, or config.data.jitter_first=False). Decoding a frame a third to a
quarter of the size, with no resize left, is what makes it fast.

--uncompressed_images stores every image as its RGB pixels (an NPY array) in uncompressed
records, instead of the original file's bytes in TFDS's compressed records: about
6 MB per GTA5 frame (about 150 GB for GTA5, 2-3 times its PNGs), read with no decoding.
Labels become NPY compressed by zlib level 1 (smaller than their PNGs, decoded in about
1 ms instead of 6-9). With config.data.resize_on_device the reading processes of stages
1-2 do little but decode, so this gives them about 2.5 times their rate. A dataset
already prepared is left as it is: remove its folder to prepare it again this way.

Safe to interrupt and rerun: a dataset is written to a temporary folder and renamed when
complete; a complete dataset is reported and left untouched; leftovers of an interrupted run
are removed on the next. Errors are one line (`error: ...`, exit status 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fada_jax.errors import UserError

# The stage-2 training sizes (width, height) of the configs (config_lib): with
# --at_training_size, each dataset's train split is also prepared at its size.
TRAINING_SIZES = {"gta5": (1280, 720), "synthia": (1280, 760), "cityscapes": (1024, 512)}
DEFAULT_CLASSES = {"gta5": (19,), "synthia": (16,), "cityscapes": (19, 16),
                    "cityscapes_pseudo": (19,)}
FOLDERS = {"gta5": "gta5", "synthia": "synthia", "cityscapes": "cityscapes"}


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_root", required=True, help="folder holding gta5/, synthia/, cityscapes/")
  parser.add_argument("--datasets", default="",
                      help="comma list of gta5, synthia, cityscapes, cityscapes_pseudo "
                           "(default: those found under --data_root)")
  parser.add_argument("--num_classes", default="",
                      help="19, 16 or '19,16' (default: each dataset's own settings)")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="encoding processes (default: all cores)")
  parser.add_argument("--output", default="", help="output folder (default: DATA_ROOT/prepared)")
  parser.add_argument("--pseudo_label_dir", default="",
                      help="pseudo labels (<dir>/<city>/<stem>.png) to prepare as cityscapes_pseudo")
  parser.add_argument("--skip_corrupt", action="store_true",
                      help="skip corrupt frames (counted and reported) instead of stopping")
  parser.add_argument("--at_training_size", action="store_true",
                      help="also prepare each train split at its stage-2 training size "
                      "(GTA5 1280x720, SYNTHIA 1280x760, Cityscapes 1024x512): read many "
                      "times faster by the streams that resize whole frames (stages 1-2; "
                      "the source stream with colour jitter only with "
                      "config.data.jitter_first=False), with the same batches")
  parser.add_argument("--uncompressed_images", action="store_true",
                      help="store images as raw pixels in uncompressed records and labels "
                      "as zlib-compressed arrays: 2-3x the disk, next to no decoding (what "
                      "limits reading with config.data.resize_on_device)")
  parser.add_argument("--no_progress", action="store_true", help="no progress bars")
  return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
  """(dataset, num_classes) pairs to prepare, in order."""
  root = Path(args.data_root).expanduser()
  if not root.is_dir():
    raise UserError(f"data root {root} does not exist; expected it to hold gta5/, synthia/ "
                    "and/or cityscapes/ in the release layouts")
  explicit = [d.strip() for d in args.datasets.split(",") if d.strip()]
  datasets = explicit or [d for d, folder in FOLDERS.items() if (root / folder).is_dir()]
  if not explicit and args.pseudo_label_dir:
    datasets.append("cityscapes_pseudo")
  if not datasets:
    raise UserError(f"data root {root} holds none of gta5/, synthia/, cityscapes/; "
                    "expected the release layouts (see tools/prepare_data.py --help)")
  classes = []
  for value in (v.strip() for v in args.num_classes.split(",") if v.strip()):
    if value not in ("16", "19"):
      raise UserError(f"--num_classes must be 19, 16 or '19,16', got {args.num_classes!r}")
    classes.append(int(value))
  pairs = []
  for dataset in datasets:
    if dataset not in DEFAULT_CLASSES:
      raise UserError(f"unknown dataset {dataset!r} in --datasets; expected "
                      f"{', '.join(DEFAULT_CLASSES)}")
    for num_classes in classes or DEFAULT_CLASSES[dataset]:
      if dataset == "synthia" and num_classes != 16:
        if explicit:
          raise UserError("SYNTHIA exists only in the 16-class setting; use --num_classes=16")
        continue  # Defaulted datasets: just the settings that exist.
      pairs.append((dataset, num_classes))
  return pairs


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  try:
    to_prepare = plan(args)
    # Imported after the arguments check so that `--help` and bad flags answer at once
    # (tensorflow_datasets loads with it).
    from fada_jax.data.builders import preparation  # pylint: disable=g-import-not-at-top
    output = Path(args.output).expanduser() if args.output else (
        Path(args.data_root).expanduser() / "prepared")
    for dataset, num_classes in to_prepare:
      sizes = [None]
      if args.at_training_size and dataset in TRAINING_SIZES:
        sizes.append(TRAINING_SIZES[dataset])
      for size in sizes:
        result = preparation.prepare(
            dataset, args.data_root, output, num_classes, workers=args.workers,
            pseudo_label_dir=args.pseudo_label_dir or None, skip_corrupt=args.skip_corrupt,
            progress=not args.no_progress, image_size=size,
            uncompressed_images=args.uncompressed_images)
        what = f"{dataset} ({num_classes} classes" + (
            f", train at {size[0]}x{size[1]})" if size else ")")
        counts = ", ".join(f"{split}: {n}" for split, n in result.counts.items())
        if result.already_complete:
          print(f"{what}: already complete at {result.path} ({counts}); left untouched")
        else:
          print(f"{what}: prepared {result.path} ({counts})")
        if result.skipped:
          print(f"{what}: skipped {len(result.skipped)} corrupt frame(s), first: "
                f"{result.skipped[0]}")
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted: nothing complete was lost; rerun to finish", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
