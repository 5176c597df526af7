"""tools/benchmark.py --mode=data on the synthetic streams: uint8 batches, batches/s over
the timed steps and whether they sustain a step rate."""

import importlib.util
import json

import pytest

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
  assert slow["bytes_per_batch"] == 2 * 80 * 160 * 3 + 2 * 80 * 160  # images + labels
  rate = slow["batches_per_second"]
  assert 0 < rate and slow["images_per_second"] == pytest.approx(2 * rate, rel=1e-2)
  assert slow["sustains"] is True
  fast = _run(benchmark, capsys, f"--dataset={dataset}", "--steps-per-second=1e6")
  assert fast["sustains"] is False and fast["steps_per_second"] == 1e6
  assert "sustains" not in _run(benchmark, capsys, f"--dataset={dataset}")


def test_a_non_positive_step_rate_is_refused(benchmark):
  with pytest.raises(SystemExit, match="steps-per-second"):
    benchmark.main(["--mode=data", "--dataset=synthetic_source", "--steps-per-second=0"])
