"""Folder sources: layouts, label mapping (16-bit SYNTHIA too), errors, label-info cache."""

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fada_jax.data import labels as labels_lib
from fada_jax.data import sources
from fada_jax.errors import UserError

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"


def write_png16(path, array, filter_type=0):
  """A minimal 16-bit PNG writer (grey, grey+alpha, RGB, RGBA) with filters None/Sub/Up."""
  array = np.asarray(array, np.uint16)
  if array.ndim == 2:
    array = array[..., None]
  height, width, channels = array.shape
  colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
  rows = array.astype(">u2").reshape(height, -1).view(np.uint8).astype(np.int32)
  bytes_per_pixel = 2 * channels
  filtered = []
  for y in range(height):
    row = rows[y]
    if filter_type == 1:
      row = row.copy()
      row[bytes_per_pixel:] = (rows[y][bytes_per_pixel:] - rows[y][:-bytes_per_pixel]) % 256
    elif filter_type == 2:
      row = (row - (rows[y - 1] if y else 0)) % 256
    filtered.append(bytes([filter_type]) + row.astype(np.uint8).tobytes())

  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
  Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) +
                         chunk(b"IDAT", zlib.compress(b"".join(filtered))) + chunk(b"IEND", b""))


def _rgb(seed, height=12, width=16):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _ids(seed, height=12, width=16, choices=(0, 7, 8, 11, 26, 33, 34)):
  return np.random.default_rng(seed).choice(np.array(choices, np.uint8), (height, width))


def make_gta5(root, count=3):
  (root / "gta5" / "images").mkdir(parents=True)
  (root / "gta5" / "labels").mkdir(parents=True)
  for i in range(count):
    Image.fromarray(_rgb(i)).save(root / "gta5" / "images" / f"{i:05d}.png")
    label = Image.fromarray(_ids(i)).convert("P")  # GTA5 labels are palette PNGs
    label.save(root / "gta5" / "labels" / f"{i:05d}.png")


def make_cityscapes(root, split="val", cities=("aachen", "bonn"), per_city=2):
  for city in cities:
    (root / "cityscapes" / "leftImg8bit" / split / city).mkdir(parents=True)
    (root / "cityscapes" / "gtFine" / split / city).mkdir(parents=True)
    for i in range(per_city):
      stem = f"{city}_{i:06d}_000019"
      Image.fromarray(_rgb(i)).save(
          root / "cityscapes" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
      Image.fromarray(_ids(i)).save(
          root / "cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("filter_type", [0, 1, 2])
def test_16bit_png_decoding(tmp_path, channels, filter_type):
  values = np.random.default_rng(channels).integers(0, 65536, (5, 7, channels)).astype(np.uint16)
  write_png16(tmp_path / "x.png", values, filter_type)
  decoded = sources.read_png_16bit(tmp_path / "x.png")
  np.testing.assert_array_equal(decoded.reshape(values.shape), values)
  np.testing.assert_array_equal(sources.read_label_ids(tmp_path / "x.png"), values[..., 0])


def test_gta5_folder_source(tmp_path):
  make_gta5(tmp_path)
  source = sources.make_source("gta5", tmp_path, "train", 19)
  assert len(source) == 3
  example = source[1]
  assert example["name"] == "00001"
  np.testing.assert_array_equal(example["image"], _rgb(1))
  lut = labels_lib.label_lookup("gta5", 19)
  np.testing.assert_array_equal(example["label"], lut[_ids(1)])
  assert set(np.unique(example["label"])) <= {0, 1, 2, 13, 18, 255}
  with pytest.raises(IndexError):
    source[3]


def test_gta5_label_of_another_size_is_aligned_to_the_image(tmp_path):
  make_gta5(tmp_path, 1)
  Image.fromarray(_ids(0, 6, 8)).save(tmp_path / "gta5" / "labels" / "00000.png")
  example = sources.make_source("gta5", tmp_path, "train", 19)[0]
  assert example["label"].shape == example["image"].shape[:2] == (12, 16)


def test_synthia_16bit_multichannel_labels(tmp_path):
  base = tmp_path / "synthia" / "RAND_CITYSCAPES"
  (base / "RGB").mkdir(parents=True)
  (base / "GT" / "LABELS").mkdir(parents=True)
  class_ids = np.random.default_rng(0).choice([1, 2, 3, 8, 11, 21, 22, 0, 259, 515], (12, 16))
  instance = np.random.default_rng(1).integers(0, 60000, (12, 16))
  Image.fromarray(_rgb(0)).save(base / "RGB" / "0000000.png")
  write_png16(base / "GT" / "LABELS" / "0000000.png",
              np.stack([class_ids, instance, np.zeros_like(instance)], -1), filter_type=1)
  source = sources.make_source("synthia", tmp_path, "train", 16)
  label = source[0]["label"]
  expected = {1: 9, 2: 2, 3: 0, 8: 12, 11: 15, 21: 3, 22: 255, 0: 255, 259: 255, 515: 255}
  np.testing.assert_array_equal(label, np.vectorize(expected.get)(class_ids).astype(np.uint8))
  assert source[0]["name"] == "0000000"


def test_cityscapes_and_pseudo_label_sources(tmp_path):
  make_cityscapes(tmp_path, "train")
  source = sources.make_source("cityscapes", tmp_path, "train", 16)
  assert source.names == ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019",
                          "bonn/bonn_000000_000019", "bonn/bonn_000001_000019"]
  np.testing.assert_array_equal(source[2]["label"],
                                labels_lib.label_lookup("cityscapes", 16)[_ids(0)])
  pseudo = tmp_path / "pseudo"
  for name in source.names:
    (pseudo / name).parent.mkdir(parents=True, exist_ok=True)
    train_ids = np.random.default_rng(len(name)).integers(0, 16, (12, 16)).astype(np.uint8)
    image = Image.fromarray(train_ids, "P")
    image.putpalette(labels_lib.palette(16).ravel().tolist())
    image.save(pseudo / f"{name}.png")
  pseudo_source = sources.make_source("cityscapes_pseudo", tmp_path, "train", 16,
                                      pseudo_label_dir=pseudo)
  name = pseudo_source.names[3]
  np.testing.assert_array_equal(pseudo_source[3]["label"],
                                np.asarray(Image.open(pseudo / f"{name}.png")))
  np.testing.assert_array_equal(pseudo_source[3]["image"], source[3]["image"])
  os.remove(pseudo / f"{name}.png")
  with pytest.raises(UserError, match="bonn_000001_000019"):
    sources.make_source("cityscapes_pseudo", tmp_path, "train", 16, pseudo_label_dir=pseudo)
  with pytest.raises(UserError, match="pseudo_label_dir"):
    sources.make_source("cityscapes_pseudo", tmp_path, "train", 16)


def test_missing_and_empty_folders_name_path_and_layout(tmp_path):
  with pytest.raises(UserError, match=r"nowhere.*does not exist"):
    sources.make_source("gta5", tmp_path / "nowhere", "train", 19)
  with pytest.raises(UserError, match=r"gta5/images.*expected layout: gta5/images/\*\.png"):
    sources.make_source("gta5", tmp_path, "train", 19)
  (tmp_path / "gta5" / "images").mkdir(parents=True)
  with pytest.raises(UserError, match=r"holds no \*\.png"):
    sources.make_source("gta5", tmp_path, "train", 19)
  make_cityscapes(tmp_path, "train")
  with pytest.raises(UserError, match=r"leftImg8bit/val does not exist.*gtFine"):
    sources.make_source("cityscapes", tmp_path, "val", 19)
  with pytest.raises(UserError, match="unknown folder dataset"):
    sources.make_source("kitti", tmp_path, "train", 19)


def test_unpaired_files_are_named(tmp_path):
  make_gta5(tmp_path)
  os.remove(tmp_path / "gta5" / "labels" / "00002.png")
  with pytest.raises(UserError, match=r"images/00002\.png has no label"):
    sources.make_source("gta5", tmp_path, "train", 19)
  Image.fromarray(_ids(0)).save(tmp_path / "gta5" / "labels" / "00002.png")
  Image.fromarray(_ids(0)).save(tmp_path / "gta5" / "labels" / "00009.png")
  with pytest.raises(UserError, match=r"labels/00009\.png has no image"):
    sources.make_source("gta5", tmp_path, "train", 19)
  make_cityscapes(tmp_path, "val")
  os.remove(tmp_path / "cityscapes" / "gtFine" / "val" / "bonn" /
            "bonn_000001_000019_gtFine_labelIds.png")
  with pytest.raises(UserError, match="bonn_000001_000019_leftImg8bit.png has no label"):
    sources.make_source("cityscapes", tmp_path, "val", 19)


def test_corrupt_image_errors_or_is_skipped_and_counted(tmp_path):
  make_gta5(tmp_path)
  corrupt = tmp_path / "gta5" / "images" / "00001.png"
  corrupt.write_bytes(corrupt.read_bytes()[:60])  # truncated
  source = sources.make_source("gta5", tmp_path, "train", 19)
  source[0]
  with pytest.raises(UserError, match=r"corrupt or truncated image file .*00001\.png"):
    source[1]
  skipping = sources.make_source("gta5", tmp_path, "train", 19, skip_corrupt=True)
  assert skipping[1]["name"] == "00002" and skipping.skipped == {1}
  assert skipping[1]["name"] == "00002" and len(skipping.skipped) == 1


def test_label_info_table_is_computed_and_cached(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "_CACHE_DIR", tmp_path / "user_cache")
  make_gta5(tmp_path, 4)
  source = sources.make_source("gta5", tmp_path, "train", 19)
  table = source.class_presence(progress=False)
  lut = labels_lib.label_lookup("gta5", 19)
  for i in range(4):
    expected = np.zeros(19, bool)
    present = np.unique(lut[_ids(i)])
    expected[present[present < 19]] = True
    np.testing.assert_array_equal(table[i], expected)
  cached = list((tmp_path / "gta5").glob(".fada_jax_label_info_*.npy"))
  assert len(cached) == 1
  np.save(cached[0], ~table)  # a cache hit returns the stored table, not a recomputation
  np.testing.assert_array_equal(source.class_presence(progress=False), ~table)
  # Another file list is another key.
  os.remove(tmp_path / "gta5" / "images" / "00003.png")
  os.remove(tmp_path / "gta5" / "labels" / "00003.png")
  smaller = sources.make_source("gta5", tmp_path, "train", 19).class_presence(progress=False)
  np.testing.assert_array_equal(smaller, table[:3])


def test_real_cityscapes_fixture_decodes_to_train_ids():
  if not (FIXTURES / "cityscapes").is_dir():
    pytest.skip("fixture absent: ../shared/fixtures/cityscapes")
  source = sources.make_source("cityscapes", FIXTURES, "val", 19)
  assert source.names == ["frankfurt/frankfurt_000000_000294"]
  example = source[0]
  assert example["image"].dtype == np.uint8 and example["image"].shape == (128, 256, 3)
  raw = np.asarray(Image.open(FIXTURES / "cityscapes" / "gtFine" / "val" / "frankfurt" /
                              "frankfurt_000000_000294_gtFine_labelIds.png"))
  np.testing.assert_array_equal(example["label"],
                                labels_lib.label_lookup("cityscapes", 19)[raw])
  present = set(np.unique(example["label"]).tolist())
  assert {0, 2, 13} <= present  # a street scene: road, building, car
  assert present <= set(range(19)) | {255}
