"""TFDS preparation of small folders in each layout, read back through `prepared`."""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fada_jax.data import labels as labels_lib
from fada_jax.data import prepare
from fada_jax.data import prepared
from fada_jax.data import sources as sources_lib
from fada_jax.data.builders import layout, preparation
from fada_jax.errors import UserError


# Cityscapes label ids used in the written labels, mapped and unmapped (0, 1, 4, 255).
_CITYSCAPES_IDS = np.array([0, 1, 4, 7, 8, 11, 21, 23, 24, 26, 27, 31, 33, 255], np.uint8)
_SYNTHIA_IDS = np.array([0, 1, 2, 3, 4, 8, 10, 13, 21, 300, 1027], np.uint16)
_SYNTHIA_CLASS_IDS = []  # Channel 0 of each written SYNTHIA label, filled by the fixture.


def _paeth(a, b, c):
  p = a + b - c
  pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
  return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def write_png(path: Path, array: np.ndarray) -> None:
  """A PNG of uint8/uint16 grey or 2..4 channels, cycling through all five row filters.

  Pillow cannot write 16-bit multi-channel PNGs (SYNTHIA's label format); the filters make
  the decoder's unfiltering (with its bytes-per-pixel) matter.
  """
  if array.ndim == 2:
    array = array[:, :, None]
  height, width, channels = array.shape
  depth = 16 if array.dtype == np.uint16 else 8
  colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
  raw = np.ascontiguousarray(array.astype(">u2" if depth == 16 else np.uint8))
  rows = raw.view(np.uint8).reshape(height, -1).astype(np.int32)
  bpp = channels * depth // 8
  out = []
  for y in range(height):
    row = rows[y]
    prior = rows[y - 1] if y else np.zeros_like(row)
    left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
    upper_left = np.concatenate([np.zeros(bpp, np.int32), prior[:-bpp]])
    kind = y % 5
    predictor = [0 * row, left, prior, (left + prior) // 2, _paeth(left, prior, upper_left)][kind]
    out.append(bytes([kind]) + ((row - predictor) % 256).astype(np.uint8).tobytes())

  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(
        ">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
  header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                   + chunk(b"IDAT", zlib.compress(b"".join(out))) + chunk(b"IEND", b""))


def _image(rng, width, height):
  return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save(path: Path, array: np.ndarray, mode=None) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array, mode).save(path)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  """Small folders in every layout (GTA5 with an odd-sized frame, 16-bit SYNTHIA labels)."""
  root = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  for i, (w, h) in enumerate([(40, 22), (40, 22), (37, 19)]):  # The last: unusual size.
    _save(root / "gta5" / "images" / f"{i:05d}.png", _image(rng, w, h))
    ids = rng.choice(_CITYSCAPES_IDS, (h, w))
    if i == 1:  # A palette label, as the real GTA5 files are.
      label = Image.fromarray(ids, "P")
      label.putpalette(rng.integers(0, 256, 768).tolist())
      label.save(root / "gta5" / "labels" / f"{i:05d}.png")
    else:
      _save(root / "gta5" / "labels" / f"{i:05d}.png", ids)
    assert (np.asarray(Image.open(root / "gta5" / "labels" / f"{i:05d}.png")) == ids).all()
  synthia = root / "synthia" / "RAND_CITYSCAPES"
  (synthia / "GT" / "LABELS").mkdir(parents=True)
  for i, channels in enumerate([3, 2, 4]):
    _save(synthia / "RGB" / f"{i:07d}.png", _image(rng, 30, 18))
    label = rng.integers(0, 65535, (18, 30, channels)).astype(np.uint16)
    label[..., 0] = rng.choice(_SYNTHIA_IDS, (18, 30))
    _SYNTHIA_CLASS_IDS.append(label[..., 0].copy())
    write_png(synthia / "GT" / "LABELS" / f"{i:07d}.png", label)
  for split, cities in (("train", ("aachen", "bochum")), ("val", ("frankfurt",))):
    for city in cities:
      for j in range(2):
        stem = f"{city}_000000_{j:06d}"
        _save(root / "cityscapes" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
              _image(rng, 32, 16))
        _save(root / "cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
              rng.choice(_CITYSCAPES_IDS, (16, 32)))
        if split == "train":
          pseudo = rng.integers(0, 19, (16, 32)).astype(np.uint8)
          pseudo[:2] = 255
          _save(root / "pseudo" / city / f"{stem}.png", pseudo)
  return root


def _check_against_folder(source, folder, expected_len):
  assert len(source) == len(folder) == expected_len
  presence = folder.class_presence(progress=False)
  np.testing.assert_array_equal(source.class_presence(), presence)
  for i in range(len(source)):
    got, want = source[i], folder[i]
    assert got["name"] == want["name"]
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
    assert got["image"].dtype == np.uint8 and got["label"].dtype == np.uint8
    np.testing.assert_array_equal(source.classes_per_example()[i], np.flatnonzero(presence[i]))
    np.testing.assert_array_equal(source.read_encoded(i)["classes"], np.flatnonzero(presence[i]))


def test_gta5_prepared_with_worker_processes_matches_the_folder_source(data_root, tmp_path):
  result = preparation.prepare("gta5", data_root, tmp_path, 19, workers=2, progress=False)
  assert not result.already_complete and result.counts == {"train": 3}
  source = prepared.make_prepared_source("gta5", data_root, "train", 19, prepared_dir=tmp_path)
  _check_against_folder(source, sources_lib.make_source("gta5", data_root, "train", 19), 3)
  # The unusual frame keeps its size; labels are mapped independently of the folder source.
  assert source[2]["image"].shape == (19, 37, 3)
  ids = np.asarray(Image.open(data_root / "gta5" / "labels" / "00002.png"))
  np.testing.assert_array_equal(source[2]["label"], labels_lib.label_lookup("gta5", 19)[ids])
  assert source[2]["image"].tobytes() == np.asarray(
      Image.open(data_root / "gta5" / "images" / "00002.png")).tobytes()


def test_uncompressed_images_hold_the_same_pixels(data_root, tmp_path):
  preparation.prepare("gta5", data_root, tmp_path, 19, workers=1, progress=False,
                      uncompressed_images=True)
  source = prepared.make_prepared_source("gta5", data_root, "train", 19, prepared_dir=tmp_path)
  _check_against_folder(source, sources_lib.make_source("gta5", data_root, "train", 19), 3)
  for i in range(len(source)):
    record = source.read_encoded(i)
    assert record["image"].startswith(b"\x93NUMPY")  # the pixels themselves
    assert zlib.decompress(record["label"]).startswith(b"\x93NUMPY")  # not a PNG
  metadata = json.loads((source.path / "metadata.json").read_text())
  assert metadata["images"] == "NPY, uncompressed records"
  assert metadata["labels"] == "NPY, zlib level 1"


def test_corrupt_stored_labels_are_named(data_root, tmp_path):
  preparation.prepare("gta5", data_root, tmp_path, 19, workers=1, progress=False,
                      uncompressed_images=True)
  source = prepared.make_prepared_source("gta5", data_root, "train", 19, prepared_dir=tmp_path)
  record = dict(source.read_encoded(0))
  name = source.names[0]
  for label in (record["label"][:-9], zlib.compress(b"not an array"), b"\x89PNG\r\n"):
    with pytest.raises(sources_lib.CorruptFileError, match=f"corrupt stored label of {name}"):
      source._decode({**record, "label": label})  # pylint: disable=protected-access


def test_uncompressed_images_go_into_uncompressed_records(tmp_path):
  # Flat-colour frames: compressed records would hold them in a few kB.
  root = tmp_path / "data"
  for i in range(2):
    _save(root / "gta5" / "images" / f"{i:05d}.png", np.full((200, 300, 3), 40 * i, np.uint8))
    _save(root / "gta5" / "labels" / f"{i:05d}.png", np.full((200, 300), 7, np.uint8))
  preparation.prepare("gta5", root, tmp_path / "out", 19, workers=1, progress=False,
                      uncompressed_images=True)
  source = prepared.make_prepared_source("gta5", root, "train", 19,
                                         prepared_dir=tmp_path / "out")
  stored = sum(f.stat().st_size for f in source.path.glob("*array_record*"))
  assert stored >= 2 * 200 * 300 * 3
  np.testing.assert_array_equal(source[1]["image"], np.full((200, 300, 3), 40, np.uint8))


def test_synthia_16bit_labels(data_root, tmp_path):
  preparation.prepare("synthia", data_root, tmp_path, 16, progress=False)
  source = prepared.make_prepared_source("synthia", data_root, "train", 16, prepared_dir=tmp_path)
  _check_against_folder(source, sources_lib.make_source("synthia", data_root, "train", 16), 3)
  # Against the written arrays: the class id of channel 0 at full 16-bit precision.
  lut = labels_lib.label_lookup("synthia", 16)
  assert len(_SYNTHIA_CLASS_IDS) == 3
  for i in range(3):
    np.testing.assert_array_equal(source[i]["label"], lut[_SYNTHIA_CLASS_IDS[i]])
  with pytest.raises(UserError, match="16-class"):
    preparation.prepare("synthia", data_root, tmp_path, 19, progress=False)


def test_cityscapes_train_val_and_pseudo(data_root, tmp_path):
  preparation.prepare("cityscapes", data_root, tmp_path, 16, progress=False)
  for split, count in (("train", 4), ("val", 2)):
    source = prepared.make_prepared_source("cityscapes", data_root, split, 16,
                                           prepared_dir=tmp_path)
    _check_against_folder(source, sources_lib.make_source("cityscapes", data_root, split, 16),
                          count)
  assert source.names == ["frankfurt/frankfurt_000000_000000", "frankfurt/frankfurt_000000_000001"]
  pseudo_dir = data_root / "pseudo"
  preparation.prepare("cityscapes_pseudo", data_root, tmp_path, 19, pseudo_label_dir=pseudo_dir,
                      progress=False)
  source = prepared.make_prepared_source("cityscapes_pseudo", data_root, "train", 19,
                                         pseudo_label_dir=pseudo_dir, prepared_dir=tmp_path)
  folder = sources_lib.make_source("cityscapes_pseudo", data_root, "train", 19,
                                   pseudo_label_dir=pseudo_dir)
  _check_against_folder(source, folder, 4)
  expected = np.asarray(Image.open(pseudo_dir / "aachen" / "aachen_000000_000001.png"))
  np.testing.assert_array_equal(source[1]["label"], expected)


def test_rerun_is_a_no_op_and_leftovers_of_an_interruption_are_recovered(data_root, tmp_path):
  first = preparation.prepare("gta5", data_root, tmp_path, 19, progress=False)
  files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.path.iterdir()}
  again = preparation.prepare("gta5", data_root, tmp_path, 19, progress=False)
  assert again.already_complete and again.path == first.path
  assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in again.path.iterdir()} == files
  # The tool reports it and leaves it alone too.
  assert prepare.main([f"--data_root={data_root}", f"--output={tmp_path}",
                       "--datasets=gta5", "--no_progress"]) == 0
  assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.path.iterdir()} == files

  # An interrupted run leaves a temporary folder; the next run removes it and completes.
  path = layout.prepared_path(tmp_path, "gta5", 16)
  leftover = path.parent / f"incomplete.ABC123_{layout.VERSION}"
  leftover.mkdir(parents=True)
  (leftover / "gta5-train.array_record-00000-of-00001").write_bytes(b"partial")
  with pytest.raises(UserError, match="not prepared"):
    prepared.make_prepared_source("gta5", data_root, "train", 16, prepared_dir=tmp_path)
  result = preparation.prepare("gta5", data_root, tmp_path, 16, progress=False)
  assert not result.already_complete and not leftover.exists()
  assert len(prepared.make_prepared_source("gta5", data_root, "train", 16,
                                           prepared_dir=tmp_path)) == 3


def test_a_failure_midway_leaves_nothing_and_a_corrupt_frame_can_be_skipped(data_root, tmp_path):
  root = tmp_path / "data"
  (root / "gta5").mkdir(parents=True)
  for sub in ("images", "labels"):
    (root / "gta5" / sub).mkdir()
    for p in sorted((data_root / "gta5" / sub).iterdir()):
      (root / "gta5" / sub / p.name).write_bytes(p.read_bytes())
  good = (root / "gta5" / "images" / "00001.png").read_bytes()
  (root / "gta5" / "images" / "00001.png").write_bytes(good[:len(good) // 2])
  output = tmp_path / "prepared"
  with pytest.raises(UserError, match="00001.png"):
    preparation.prepare("gta5", root, output, 19, progress=False)
  config_dir = layout.prepared_path(output, "gta5", 19).parent
  assert not any(config_dir.iterdir()) if config_dir.is_dir() else True
  result = preparation.prepare("gta5", root, output, 19, skip_corrupt=True, progress=False)
  assert result.counts == {"train": 2} and len(result.skipped) == 1
  assert "00001.png" in result.skipped[0]
  source = prepared.make_prepared_source("gta5", root, "train", 19, prepared_dir=output)
  assert source.names == ["00000", "00002"] and source.skipped == result.skipped


def test_tool_prepares_everything_and_reports_errors_in_one_line(data_root, tmp_path, capsys):
  assert prepare.main([f"--data_root={data_root}", f"--output={tmp_path}", "--workers=1",
                       f"--pseudo_label_dir={data_root / 'pseudo'}", "--no_progress"]) == 0
  out = capsys.readouterr().out
  for name, classes in (("gta5", 19), ("synthia", 16), ("cityscapes", 19), ("cityscapes", 16),
                        ("cityscapes_pseudo", 19)):
    assert f"{name} ({classes} classes): prepared" in out
  assert prepare.main([f"--data_root={tmp_path / 'missing'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "missing" in err and err.count("\n") == 1
  assert prepare.main([f"--data_root={data_root}", "--datasets=synthia",
                       "--num_classes=19", f"--output={tmp_path}"]) == 2
  assert "16-class" in capsys.readouterr().err


def test_the_tool_is_the_modules_command_line(tmp_path):
  repo = Path(__file__).resolve().parent.parent
  result = subprocess.run(
      [sys.executable, str(repo / "tools" / "prepare_data.py"),
       f"--data_root={tmp_path / 'missing'}"], capture_output=True, text=True, timeout=120,
      env={**os.environ, "PYTHONPATH": str(repo)})
  assert result.returncode == 2
  assert result.stderr.startswith("error: data root ") and result.stderr.count("\n") == 1


def test_unprepared_dataset_names_the_path_and_the_command(tmp_path):
  with pytest.raises(UserError) as info:
    prepared.make_prepared_source("cityscapes", tmp_path, "val", 19)
  message = str(info.value)
  assert str(tmp_path / "prepared" / "cityscapes" / "classes19") in message
  assert "tools/prepare_data.py" in message and "\n" not in message
