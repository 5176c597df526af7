"""tools/benchmark.py --mode=data on the synthetic streams: uint8 batches, batches/s over
the timed steps and whether they sustain a step rate."""

import importlib.util
import json

import pytest
from PIL import Image

from tiny_runs import REPO


@pytest.fixture(scope="module")
def benchmark():
  spec = importlib.util.spec_from_file_location("benchmark", REPO / "tools" / "benchmark.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(benchmark, capsys, *flags):
  assert benchmark.main(["--mode=data", "--batch=2", "--steps=3", "--json", *flags]) == 0
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("dataset", ["synthetic_source", "synthetic_target"])
def test_data_benchmark_says_whether_the_stream_sustains_a_step_rate(benchmark, capsys,
                                                                     dataset):
  slow = _run(benchmark, capsys, f"--dataset={dataset}", "--steps-per-second=0.001")
  assert slow["dataset"] == dataset and slow["workers"] == 0
  assert slow["image_dtype"] == "uint8" and slow["image_shape"] == [2, 80, 160, 3]
  labels = 2 * 80 * 160 if dataset == "synthetic_source" else 0  # the step uses no target label
  assert slow["bytes_per_batch"] == 2 * 80 * 160 * 3 + labels
  rate = slow["batches_per_second"]
  assert 0 < rate and slow["images_per_second"] == pytest.approx(2 * rate, rel=1e-2)
  assert slow["sustains"] is True
  fast = _run(benchmark, capsys, f"--dataset={dataset}", "--steps-per-second=1e6")
  assert fast["sustains"] is False and fast["steps_per_second"] == 1e6
  assert "sustains" not in _run(benchmark, capsys, f"--dataset={dataset}")


def test_a_non_positive_step_rate_is_refused(benchmark):
  with pytest.raises(SystemExit, match="steps-per-second"):
    benchmark.main(["--mode=data", "--dataset=synthetic_source", "--steps-per-second=0"])


def test_both_stage2_streams_at_once_report_each_stream_and_the_slower_rate(benchmark, capsys):
  result = _run(benchmark, capsys, "--dataset=demo", "--steps-per-second=0.001")
  source, target = result["streams"]["source"], result["streams"]["target"]
  assert source["image_shape"] == [2, 80, 160, 3] and target["image_shape"] == [2, 80, 160, 3]
  # A step needs a batch of each stream: the input's step rate is the slower stream's.
  assert result["batches_per_second"] == min(source["batches_per_second"],
                                             target["batches_per_second"])
  assert result["images_per_second"] == pytest.approx(
      source["images_per_second"] + target["images_per_second"], abs=2e-3)
  for stream in (source, target):
    assert stream["images_per_second"] == pytest.approx(2 * stream["batches_per_second"],
                                                        rel=1e-2)
  assert result["sustains"] is True
  assert _run(benchmark, capsys, "--dataset=demo", "--steps-per-second=1e6")["sustains"] is False


def test_generated_frames_in_the_real_layouts_folder_and_array_record(benchmark, capsys,
                                                                      tmp_path, monkeypatch):
  # The real frame sizes take a minute to render; the layout and formats are the point.
  monkeypatch.setattr(benchmark, "GTA5_FRAME", (48, 26))
  monkeypatch.setattr(benchmark, "CITYSCAPES_FRAME", (64, 32))
  root = tmp_path / "generated"
  folder = _run(benchmark, capsys, f"--generate={root}", "--generate_frames=3")
  assert folder["generated"] and folder["format"] == "folder"
  assert sorted(p.name for p in (root / "gta5" / "images").iterdir()) == [
      "00000.png", "00001.png", "00002.png"]
  assert len(list((root / "cityscapes" / "gtFine" / "train").rglob("*_labelIds.png"))) == 3
  assert Image.open(root / "gta5" / "images" / "00000.png").size == (48, 26)
  frame = next((root / "cityscapes" / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))
  assert Image.open(frame).size == (64, 32)
  # The stage-2 training sizes: source 1280x720, target 1024x512.
  assert folder["streams"]["source"]["image_shape"] == [2, 720, 1280, 3]
  assert folder["streams"]["target"]["image_shape"] == [2, 512, 1024, 3]
  assert folder["streams"]["source"]["prepared_size"] is None
  prepared = _run(benchmark, capsys, f"--generate={root}", "--generate_frames=3",
                  "--format=array_record", "--dataset=gta5")
  assert prepared["format"] == "array_record" and prepared["image_shape"] == [2, 720, 1280, 3]
  assert (root / "prepared" / "gta5" / "classes19").is_dir()
  assert (root / "prepared" / "cityscapes" / "classes19").is_dir()
  # Also prepared at the training sizes: read by the streams whose batches they give.
  assert prepared["prepared_size"] is None  # colour jitter first, on the full-size frame
  resized = _run(benchmark, capsys, f"--generate={root}", "--format=array_record",
                 "--jitter_after_resize")
  assert resized["streams"]["source"]["prepared_size"] == [1280, 720]
  assert resized["streams"]["target"]["prepared_size"] == [1024, 512]


def test_generate_refuses_the_synthetic_streams(benchmark):
  with pytest.raises(SystemExit, match="generate"):
    benchmark.main(["--mode=data", "--dataset=demo", "--generate=/nonexistent"])
