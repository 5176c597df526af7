"""The summary sheet: one row per frame (image, ground truth, each model's prediction in
the Cityscapes palette) and the mIoU table, written by --mode=eval and --mode=pipeline."""


import numpy as np
import pytest
from PIL import Image

from fada_jax import config_lib, evaluate
from fada_jax.data import labels as labels_lib
from fada_jax.data import pipeline, synthetic
from fada_jax.evaluate import summary_sheet

FRAME_HW = (20, 40)  # the sheet's cell is 8 times larger: every pixel a uniform 8x8 block


def _cell_pixels(sheet: np.ndarray, layout, row: int, column: int, frame_hw) -> np.ndarray:
  """The cell's content sampled back at frame resolution (centre of each enlarged pixel)."""
  left, top, right, bottom = layout.cell(row, column)
  cell = sheet[top:bottom, left:right]
  step_y, step_x = cell.shape[0] // frame_hw[0], cell.shape[1] // frame_hw[1]
  return cell[step_y // 2::step_y, step_x // 2::step_x]


def test_sheet_has_a_row_per_frame_with_image_truth_and_each_prediction(tmp_path):
  rng = np.random.default_rng(0)
  frames = 3
  images = [rng.integers(0, 256, FRAME_HW + (3,), dtype=np.uint8) for _ in range(frames)]
  labels = [rng.integers(0, 19, FRAME_HW, dtype=np.uint8) for _ in range(frames)]
  labels[1][:4] = 255  # ignored pixels: black
  first = [rng.integers(0, 19, FRAME_HW, dtype=np.uint8) for _ in range(frames)]
  second = [np.full(FRAME_HW, 13, np.uint8) for _ in range(frames)]
  sheet = summary_sheet.draw_sheet(images, labels, [first, second], ['stage a', 'stage b'],
                                   [0.25, None], 19)
  path = tmp_path / 'sheet.png'
  sheet.save(path)
  with Image.open(path) as reread:
    assert reread.format == 'PNG'
    pixels = np.asarray(reread.convert('RGB'))

  layout = summary_sheet.sheet_layout(frames, 2, FRAME_HW, num_table_lines=3)
  assert (layout.num_rows, layout.num_columns) == (frames, 4)
  assert pixels.shape == (layout.size[1], layout.size[0], 3)
  assert layout.cell_height * FRAME_HW[1] == layout.cell_width * FRAME_HW[0]
  for row in range(frames):
    np.testing.assert_array_equal(_cell_pixels(pixels, layout, row, 1, FRAME_HW),
                                  labels_lib.colorize(labels[row]))
    np.testing.assert_array_equal(_cell_pixels(pixels, layout, row, 2, FRAME_HW),
                                  labels_lib.colorize(first[row]))
    np.testing.assert_array_equal(_cell_pixels(pixels, layout, row, 3, FRAME_HW),
                                  labels_lib.colorize(second[row]))
    # The image column is the frame, smoothly enlarged: close to it, not a mask.
    image_cell = _cell_pixels(pixels, layout, row, 0, FRAME_HW).astype(int)
    assert np.mean(np.abs(image_cell - images[row])) < 40
  assert np.all(_cell_pixels(pixels, layout, 1, 1, FRAME_HW)[:4] == 0)
  # Header and table are drawn: dark text on the white margins.
  assert np.any(pixels[:summary_sheet.HEADER_HEIGHT] < 128)
  assert np.any(pixels[layout.table_top:] < 128)
  assert summary_sheet.miou_table(['stage a', 'stage b'], [0.25, None])[1:] == [
      ('stage a', '25.00'), ('stage b', '-')]


def test_draw_sheet_refuses_missing_predictions():
  frame = np.zeros(FRAME_HW, np.uint8)
  with pytest.raises(ValueError, match='every frame'):
    summary_sheet.draw_sheet([frame[..., None].repeat(3, -1)] * 2, [frame] * 2, [[frame]],
                             ['a'], [None], 19)


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('data')
  synthetic.write_synthetic_folders(root, 0, 1, 5, image_size=(64, 32), seed=0)
  return root


def _config(root):
  config = config_lib.make_config('g2c', 'source_only', 'resnet18')
  config.model.width = 4
  config.data.root = str(root)
  config.data.test_size = (64, 32)
  config.data.workers = 0
  config.eval.batch_size = 4
  config.eval.save_predictions = True
  return config


def test_eval_writes_the_sheet_of_its_first_frames_as_its_masks(data_root, tmp_path):
  """--mode=eval's summary.png shows, per row, the frame's label and the same prediction
  as the evaluation's own colour mask of that frame (a different compiled path)."""
  from test_evaluate import random_variables, save  # pylint: disable=g-import-not-at-top
  config = _config(data_root)
  path = save(tmp_path / 'model', random_variables(config, 1))
  evaluate.run_eval(config, path, tmp_path / 'work')
  sheet_path = tmp_path / 'work' / 'eval' / summary_sheet.SUMMARY_IMAGE
  with Image.open(sheet_path) as sheet:
    assert sheet.format == 'PNG'
    pixels = np.asarray(sheet.convert('RGB'))

  source = pipeline.open_source(config, 'cityscapes', 'val')
  frames = min(summary_sheet.DEFAULT_FRAMES, len(source))
  assert len(source) > frames  # the sheet takes the first frames, not all
  frame_hw = np.shape(source[0]['label'])
  layout = summary_sheet.sheet_layout(frames, 1, frame_hw, num_table_lines=2)
  assert pixels.shape == (layout.size[1], layout.size[0], 3)
  for row in range(frames):
    example = source[row]
    np.testing.assert_array_equal(_cell_pixels(pixels, layout, row, 1, frame_hw),
                                  labels_lib.colorize(example['label']))
    mask = tmp_path / 'work' / 'eval' / 'color' / f"{example['name']}.png"
    with Image.open(mask) as written:
      expected = np.asarray(written.convert('RGB'))
    np.testing.assert_array_equal(_cell_pixels(pixels, layout, row, 2, frame_hw), expected)
  # A random network predicts more than one class: the check above can tell rows apart.
  assert len(np.unique(expected.reshape(-1, 3), axis=0)) > 1
