"""A picture of a result: target frames with their ground truth and each model's prediction.

`write_summary_sheet(config, models, PATH)` draws one row per frame (the first frames of
config.eval.split of the target): the image, its ground truth and the prediction of every
model, masks in the Cityscapes palette, under a header naming each column, and the mIoU
table below. `--mode=pipeline` writes DIR/summary.png (a column per stage), `--mode=eval`
DIR/eval/summary.png (its checkpoint, or the best of a folder).

Drawn with PIL only. `draw_sheet` takes arrays and is independent of any model;
`sheet_layout` gives the pixel boxes it draws into.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fada_jax import checkpoint as checkpoint_lib
from fada_jax.data import labels as labels_lib
from fada_jax.errors import UserError

SUMMARY_IMAGE = "summary.png"
DEFAULT_FRAMES = 4
# Every frame is drawn this wide: small demo frames are enlarged (nearest neighbour, so
# mask pixels stay one class each), Cityscapes frames shrunk.
CELL_WIDTH = 320
GAP = 4
HEADER_HEIGHT = 24
LINE_HEIGHT = 18
FONT_SIZE = 14
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


@dataclasses.dataclass(frozen=True)
class Model:
  """One prediction column: its title, the checkpoint to predict with, its target mIoU."""
  title: str
  checkpoint: str | os.PathLike
  miou: float | None = None


@dataclasses.dataclass(frozen=True)
class SheetLayout:
  """Pixel geometry of a sheet: `cell(row, column)` is the (left, top, right, bottom) box
  of a frame's image (column 0), ground truth (1) or prediction of model column - 2."""
  num_rows: int
  num_columns: int
  cell_width: int
  cell_height: int
  num_table_lines: int

  def cell(self, row: int, column: int) -> tuple[int, int, int, int]:
    left = GAP + column * (self.cell_width + GAP)
    top = HEADER_HEIGHT + row * (self.cell_height + GAP)
    return left, top, left + self.cell_width, top + self.cell_height

  @property
  def table_top(self) -> int:
    return HEADER_HEIGHT + self.num_rows * (self.cell_height + GAP) + GAP

  @property
  def size(self) -> tuple[int, int]:
    """(width, height) of the whole sheet."""
    width = GAP + self.num_columns * (self.cell_width + GAP)
    return width, self.table_top + self.num_table_lines * LINE_HEIGHT + GAP


def sheet_layout(num_rows: int, num_models: int, frame_hw: Sequence[int],
                 num_table_lines: int) -> SheetLayout:
  """The layout of `num_rows` frames of shape `frame_hw` (of the ground truth) with
  `num_models` prediction columns and a table of `num_table_lines` lines."""
  height, width = (int(v) for v in frame_hw[:2])
  cell_height = max(1, round(CELL_WIDTH * height / width))
  return SheetLayout(num_rows, 2 + num_models, CELL_WIDTH, cell_height, num_table_lines)


def _font() -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(FONT_SIZE)
  except TypeError:  # Pillow < 10.1 has one bitmap size only
    return ImageFont.load_default()


def _fit(image: Image.Image, size: tuple[int, int], resample) -> Image.Image:
  return image if image.size == size else image.resize(size, resample)


def miou_table(titles: Sequence[str], mious: Sequence[float | None]) -> list[tuple[str, str]]:
  """The rows (model, target mIoU) of the table under the sheet, its header first."""
  return [("model", "target mIoU")] + [
      (title, "-" if miou is None else f"{100 * miou:.2f}") for title, miou in zip(titles, mious)]


def draw_sheet(images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
               predictions: Sequence[Sequence[np.ndarray]], titles: Sequence[str],
               mious: Sequence[float | None], num_classes: int) -> Image.Image:
  """The sheet as an RGB image.

  images: uint8 RGB [H, W, 3] per frame (any size: drawn at the label's shape);
  labels: train ids [h, w] per frame (255 = ignore, drawn black);
  predictions[m][f]: train ids of model m on frame f, the label's shape;
  titles, mious: per model, for the header and the table.
  """
  if not len(images) == len(labels) or not all(len(p) == len(labels) for p in predictions):
    raise ValueError("one image, one label and one prediction per model for every frame")
  if len(titles) != len(predictions) or len(mious) != len(predictions):
    raise ValueError("one title and one mIoU per model")
  table = miou_table(titles, mious)
  layout = sheet_layout(len(labels), len(predictions), np.shape(labels[0]), len(table))
  sheet = Image.new("RGB", layout.size, BACKGROUND)
  draw = ImageDraw.Draw(sheet)
  font = _font()
  headers = ["image", "ground truth"] + [
      title if miou is None else f"{title} ({100 * miou:.1f})"
      for title, miou in zip(titles, mious)]
  for column, header in enumerate(headers):
    left = layout.cell(0, column)[0]
    draw.text((left + 2, 4), header, fill=TEXT, font=font)
  cell_size = (layout.cell_width, layout.cell_height)
  for row, (image, label) in enumerate(zip(images, labels)):
    columns = [_fit(Image.fromarray(np.asarray(image, np.uint8)), cell_size, Image.BILINEAR),
               _mask_image(label, num_classes, cell_size)]
    columns += [_mask_image(p[row], num_classes, cell_size) for p in predictions]
    for column, picture in enumerate(columns):
      sheet.paste(picture, layout.cell(row, column)[:2])
  # Two columns at fixed positions: the default font is proportional.
  value_left = GAP + 2 + max(draw.textlength(name, font=font) for name, _ in table) + 16
  for i, (name, value) in enumerate(table):
    top = layout.table_top + i * LINE_HEIGHT
    draw.text((GAP + 2, top), name, fill=TEXT, font=font)
    draw.text((value_left, top), value, fill=TEXT, font=font)
  return sheet


def _mask_image(train_ids: np.ndarray, num_classes: int, size: tuple[int, int]) -> Image.Image:
  coloured = Image.fromarray(labels_lib.colorize(train_ids, num_classes))
  return _fit(coloured, size, Image.NEAREST)


def first_frames(config, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """The first `count` frames of config.eval.split of the target: (images at
  config.data.test_size, the model's input; labels at full resolution)."""
  from fada_jax.data import pipeline, transforms  # pylint: disable=g-import-not-at-top
  source = pipeline.open_source(config, config.data.target.removesuffix("_pseudo"),
                                config.eval.split)
  images, labels = [], []
  for index in range(min(count, len(source))):
    example = source[index]
    images.append(transforms.resize_image(example["image"], tuple(config.data.test_size)))
    labels.append(np.asarray(example["label"], np.uint8))
  if not images:
    raise UserError(f"config.eval.split={config.eval.split!r} of {config.data.target} has no "
                    "frames to draw")
  return images, labels


def predict_frames(config, checkpoint: str | os.PathLike, images: Sequence[np.ndarray],
                   labels: Sequence[np.ndarray]) -> list[np.ndarray]:
  """The checkpoint's train-id prediction of every frame, at its label's shape."""
  from fada_jax.evaluate.inference import predictor_for  # pylint: disable=g-import-not-at-top
  predictor = predictor_for(config)
  variables, _ = checkpoint_lib.load_model(checkpoint)
  predictor.check_variables(variables, f"checkpoint {checkpoint}")
  placed = predictor.place_variables(variables)
  out: list[np.ndarray | None] = [None] * len(images)
  # One call per label size (the logits are upsampled to it): usually one for all frames.
  for shape in sorted({label.shape for label in labels}):
    rows = [i for i, label in enumerate(labels) if label.shape == shape]
    batch = np.stack([np.asarray(images[i]) for i in rows])
    for i, prediction in zip(rows, predictor.predict(placed, batch, shape)):
      out[i] = prediction
  return out


def write_summary_sheet(config, models: Sequence[Model], path: str | os.PathLike, *,
                        num_frames: int = DEFAULT_FRAMES) -> pathlib.Path:
  """Predicts the first frames with every model and writes the sheet to `path` (PNG).

  Every process predicts (inference is collective); the main process writes.
  """
  images, labels = first_frames(config, num_frames)
  predictions = [predict_frames(config, m.checkpoint, images, labels) for m in models]
  path = pathlib.Path(path)
  if jax.process_index() == 0:
    sheet = draw_sheet(images, labels, predictions, [m.title for m in models],
                       [m.miou for m in models], int(config.model.num_classes))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sheet.save(temporary, format="PNG")
    os.replace(temporary, path)
  return path
