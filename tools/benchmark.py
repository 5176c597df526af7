"""Throughput benchmarks of fada_jax, one `--mode` each.

  python tools/benchmark.py --mode=eval --arch=resnet101 --batch=1 --size=1024x512 --steps=3 --json
  python tools/benchmark.py --mode=eval --backend=torch ...   (the same network in PyTorch)
  python tools/benchmark.py --mode=data --data_root=/data --workers=4 --batch=4 --steps=20 --steps-per-second=6 --json
  python tools/benchmark.py --mode=data --generate=/tmp/frames --workers=2 --batch=4 --steps=10 --json
  python tools/benchmark.py --mode=data --dataset=synthetic_source --workers=2 --steps-per-second=6 --json
  python tools/benchmark.py --mode=predict --arch=resnet101 --size=2048x1024 --frames=4 --steps=2 --json

`--mode=eval` times jit-compiled single-scale inference: a batch of WxH images -> logits
upsampled (align corners) to 2Wx2H (Cityscapes' label size for the 1024x512 test size)
-> argmax, after a warm-up step, and prints the median step time, images/s and the FLOPs
of a step from XLA's cost analysis of the compiled function. Weights are random: speed
does not depend on their values (no weights download needed). Images are uint8, as the
data pipeline feeds them: the timed step includes the normalisation on the device.

`--mode=predict` times whole `--mode=predict` and `--mode=eval` runs over the same
generated frames, alternately (`run_predict` below).

`--mode=data` times the stage-2 input as it runs in training (default `--dataset=g2c`):
the GTA5 source stream and the Cityscapes target stream read at once, each with its own
`--workers` processes and each read on its own thread; per stream images/s and images/s
per worker. `--steps-per-second=R` says whether the input keeps up with a training step
rate R: `batches_per_second` is the slower stream's (a step needs a batch of each) and
`sustains` is true when that is at least R. `--generate=DIR` writes (once) generated
street scenes of the real frame sizes in the datasets' folder layouts under DIR (GTA5
1914x1052, Cityscapes 2048x1024 PNGs) and reads those; with `--format=array_record` it
also prepares them (DIR/prepared), so the input path can be timed without the datasets.

Modes register themselves with `register_mode(name, add_arguments, run)`: `run(args)`
returns the dict printed as one JSON line with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_TOOLS))  # the repo, for a run from a source checkout
# The torch side of --backend=torch is the tests' reference (tests/torch_reference.py).
_TORCH_REFERENCE = os.path.join(os.path.dirname(_TOOLS), "tests")

_MODES: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                        Callable[[argparse.Namespace], dict[str, Any]]]] = {}


def register_mode(name: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                  run: Callable[[argparse.Namespace], dict[str, Any]]) -> None:
  _MODES[name] = (add_arguments, run)


def parse_size(text: str) -> tuple[int, int]:
  """'1024x512' -> (width, height)."""
  try:
    width, height = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 1024x512, got {text!r}")
  if width <= 0 or height <= 0:
    raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
  return width, height


def time_steps(step: Callable[[], Any], steps: int, warmup: int = 1) -> list[float]:
  """Wall-clock seconds of `steps` calls of `step` (which must block) after `warmup`."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


# ----------------------------------------------------------------------------- eval


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--backend", choices=("jax", "torch"), default="jax")
  parser.add_argument("--arch", default="resnet101",
                      choices=("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"))
  parser.add_argument("--width", type=int, default=64, help="ResNet base width (64 = published)")
  parser.add_argument("--num-classes", type=int, default=19)
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                      help="torch intra-op threads (JAX on CPU uses every core)")
  parser.add_argument("--channels-last", action="store_true", help="torch: NHWC memory format")
  parser.add_argument("--matmul-convs", choices=("auto", "on", "off"), default="auto",
                      help="jax: some convolutions as matrix products (auto = on for CPU; "
                           "see fada_jax/models/conv_dispatch.py)")
  parser.add_argument("--no-transforms", action="store_true",
                      help="jax: run the plain network (no BN folding, every conv as a "
                           "convolution, whatever --matmul-convs says)")
  parser.add_argument("--memory", action="store_true",
                      help="jax: add XLA's memory analysis of the compiled step")
  parser.add_argument("--compile-only", action="store_true",
                      help="jax: compile (for --memory and the FLOP count) without running")


def _random_variables(config, seed: int = 0) -> dict:
  """He-scaled kernels and non-trivial BN statistics on the network's variable shapes."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fada_jax import models  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(
      lambda: models.init_variables(models.build(config), jax.random.PRNGKey(0), config))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      scale = 0.01 if "classifier" in name else np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
      return (scale * rng.standard_normal(leaf.shape)).astype(np.float32)
    if "'var'" in name or "'scale'" in name:
      return (1.0 + 0.2 * rng.random(leaf.shape)).astype(np.float32)
    return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _eval_jax(args: argparse.Namespace) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fada_jax import config_lib, evaluate  # pylint: disable=g-import-not-at-top
  config = config_lib.make_config("g2c", "source_only", args.arch)
  config.model.width = args.width
  config.model.num_classes = args.num_classes
  transforms = not args.no_transforms
  matmul_convs = {"auto": None, "on": True, "off": False}[args.matmul_convs]
  predictor = evaluate.Predictor(config, fold_batch_norm=transforms,
                                 convs_as_matmuls=matmul_convs if transforms else False)
  variables = predictor.place_variables(_random_variables(config))
  width, height = args.size
  if args.batch % predictor.num_devices:
    raise SystemExit(f"--batch={args.batch} must be a multiple of the {predictor.num_devices} "
                     "devices")
  images = np.random.default_rng(0).integers(0, 256, (args.batch, height, width, 3),
                                             dtype=np.uint8)
  images = predictor.global_batch(images)
  out_hw = (2 * height, 2 * width)
  start = time.perf_counter()
  compiled = predictor._predict.lower(variables, images, out_hw=out_hw).compile()  # pylint: disable=protected-access
  compile_seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  result = {"flops_per_step": float(cost.get("flops", float("nan"))) if cost else None,
            "devices": jax.device_count(), "platform": jax.devices()[0].platform,
            "compile_seconds": round(compile_seconds, 2), "transforms": transforms,
            "matmul_convs": predictor.convs_as_matmuls}
  if args.memory:
    result.update(_memory_analysis(compiled))
  times = [] if args.compile_only else time_steps(
      lambda: compiled(variables, images).block_until_ready(), args.steps)
  result["step_seconds"] = [round(t, 4) for t in times]
  return result


def _memory_analysis(compiled) -> dict[str, Any]:
  """XLA's memory plan of a compiled function: buffer sizes in bytes and GiB."""
  memory = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  sizes = {f: int(getattr(memory, f, 0) or 0) for f in fields}
  sizes["peak_estimate_bytes"] = (sizes["argument_size_in_bytes"]
                                  + sizes["output_size_in_bytes"]
                                  - sizes["alias_size_in_bytes"]
                                  + sizes["temp_size_in_bytes"])
  return {"memory": sizes,
          "memory_gib": {k.replace("_in_bytes", "").replace("_bytes", ""): round(v / 2**30, 3)
                         for k, v in sizes.items()}}


def _torch_normalize(pixels):
  """uint8 NHWC -> ImageNet-normalised float32 NCHW, as the JAX side does on its device."""
  import torch  # pylint: disable=g-import-not-at-top
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
  return ((pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std).contiguous()


def _eval_torch(args: argparse.Namespace) -> dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, _TORCH_REFERENCE)
  import torch_reference  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  depth = int(args.arch[len("resnet"):])
  model = torch_reference.DeepLabResNet(depth, args.num_classes, args.width).eval()
  torch_reference.randomize(model, seed=0)
  width, height = args.size
  pixels = torch.randint(0, 256, (args.batch, height, width, 3), dtype=torch.uint8)
  memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
  if args.channels_last:
    model = model.to(memory_format=torch.channels_last)
  out_hw = (2 * height, 2 * width)

  def segment():
    images = _torch_normalize(pixels).contiguous(memory_format=memory_format)
    return torch_reference.segment(model, images, out_hw)

  with torch.inference_mode():
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
    counter = FlopCounterMode(display=False)
    with counter:
      segment()
    times = time_steps(segment, args.steps)
  return {"flops_per_step": float(counter.get_total_flops()), "devices": 1,
          "platform": "cpu", "threads": torch.get_num_threads(),
          "channels_last": args.channels_last, "step_seconds": [round(t, 4) for t in times]}


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
  if args.backend == "torch" and (args.memory or args.compile_only):
    raise SystemExit("--memory and --compile-only are for --backend=jax")
  result = (_eval_jax if args.backend == "jax" else _eval_torch)(args)
  times = result["step_seconds"]
  median = statistics.median(times) if times else None
  return dict({"mode": "eval", "backend": args.backend, "arch": args.arch,
               "batch": args.batch, "size": f"{args.size[0]}x{args.size[1]}",
               "step_seconds_median": round(median, 4) if median else None,
               "images_per_second": round(args.batch / median, 4) if median else None},
              **result)


register_mode("eval", _add_eval_arguments, run_eval)


# ----------------------------------------------------------------------------- data


_DATA_STREAMS = {  # --dataset -> (config task, the streams timed)
    "g2c": ("g2c", ("source", "target")), "demo": ("demo", ("source", "target")),
    "gta5": ("g2c", ("source",)), "cityscapes": ("g2c", ("target",)),
    "synthetic_source": ("demo", ("source",)), "synthetic_target": ("demo", ("target",)),
    "synthetic": ("demo", ("source",)),
}
# Frame sizes of the real datasets (width, height), for --generate.
GTA5_FRAME, CITYSCAPES_FRAME = (1914, 1052), (2048, 1024)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--dataset", choices=tuple(_DATA_STREAMS), default="g2c",
                      help="g2c (default): the stage-2 input as it trains, the GTA5 source "
                      "stream (1280x720, colour jitter) and the Cityscapes target stream "
                      "(1024x512) at once, each with its own --workers; gta5, cityscapes: "
                      "one of them alone; demo: the demo's two synthetic streams at once; "
                      "synthetic_source, synthetic_target (synthetic = synthetic_source): "
                      "one alone (generated, no data needed)")
  parser.add_argument("--steps-per-second", type=float, default=None,
                      help="the training step rate to sustain: adds 'sustains'")
  parser.add_argument("--data_root", default="", help="folder holding gta5/, cityscapes/")
  parser.add_argument("--generate", metavar="DIR", default="",
                      help="time generated street scenes of the real frame sizes and formats "
                      "instead (GTA5 1914x1052, Cityscapes 2048x1024 PNGs in the folder "
                      "layout under DIR, written if absent; prepared as ArrayRecord under "
                      "DIR/prepared with --format=array_record)")
  parser.add_argument("--generate_frames", type=int, default=16,
                      help="frames per dataset written by --generate")
  parser.add_argument("--uncompressed_images", action="store_true",
                      help="with --generate and --format=array_record: prepare the frames "
                      "as raw pixels (tools/prepare_data.py --uncompressed_images); "
                      "give it a DIR of its own, as DIR/prepared keeps what it holds")
  parser.add_argument("--workers", type=int, default=0,
                      help="grain worker processes of each stream")
  parser.add_argument("--format", choices=("folder", "array_record"), default="folder")
  parser.add_argument("--jitter_after_resize", action="store_true",
                      help="jitter the resized frame (config.data.jitter_first=False)")
  parser.add_argument("--resize_on_device", action="store_true",
                      help="leave jitter and resizing to the device "
                      "(config.data.resize_on_device='on'): the workers decode and plan; "
                      "each stream also reports the device's seconds per batch")


def generate_data(root: str, frames: int, array_record: bool, progress: bool = True,
                  uncompressed_images: bool = False) -> str:
  """Real-size generated frames under `root` (folder layout; prepared if asked): the root."""
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  from fada_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  root_path = Path(root).expanduser()
  if not (root_path / "gta5").is_dir():
    if progress:
      print(f"writing {frames} GTA5-size and {frames} Cityscapes-size frames to {root_path}",
            file=sys.stderr)
    synthetic.write_synthetic_folders(root_path, frames, frames, 2, image_size=GTA5_FRAME,
                                      target_image_size=CITYSCAPES_FRAME)
  if array_record:
    import contextlib  # pylint: disable=g-import-not-at-top
    from fada_jax.data import prepare  # pylint: disable=g-import-not-at-top
    from fada_jax.data.builders import preparation  # pylint: disable=g-import-not-at-top
    # TFDS reports on stdout, which carries the --json line.
    with contextlib.redirect_stdout(sys.stderr):
      for name in ("gta5", "cityscapes"):
        for size in (None, prepare.TRAINING_SIZES[name]):
          preparation.prepare(name, root_path, root_path / "prepared",
                              19, workers=os.cpu_count() or 1, progress=progress,
                              image_size=size, uncompressed_images=uncompressed_images)
  return str(root_path)


def _stream_stats(first: dict, times: list[float], batch: int, workers: int,
                  frame_size: list[int] | None) -> dict[str, Any]:
  batches_per_second = len(times) / sum(times)
  return {"workers": workers, "image_shape": list(first["image"].shape),
          # The frames read: prepared at the training size, or (None) full size.
          "prepared_size": frame_size,
          "image_dtype": str(first["image"].dtype),
          "bytes_per_batch": int(sum(v.nbytes for v in first.values())),
          "step_seconds_median": round(statistics.median(times), 4),
          "batches_per_second": round(batches_per_second, 3),
          "images_per_second": round(batch * batches_per_second, 3),
          "images_per_second_per_worker": round(
              batch * batches_per_second / max(workers, 1), 3)}


def _device_finish_stats(batch: dict, repeats: int = 3) -> dict[str, Any]:
  """For a batch of plans (--resize_on_device): the device's median seconds to jitter and
  resize it (after a compiling call), on JAX's default device, and the result's shape."""
  from fada_jax.data import device_augment  # pylint: disable=g-import-not-at-top
  if not device_augment.has_plans(batch):
    return {}
  import jax  # pylint: disable=g-import-not-at-top
  from fada_jax.data import pil_exact  # pylint: disable=g-import-not-at-top
  tables = [jax.device_put(t) for t in pil_exact.hsv_tables()]
  placed = jax.device_put(dict(batch))
  finish = jax.jit(device_augment.finish_batch)
  shape = finish(placed, *tables)["image"].shape
  seconds = time_steps(lambda: jax.block_until_ready(finish(placed, *tables)), repeats,
                       warmup=0)
  return {"device": str(jax.devices()[0].platform), "finished_shape": list(shape),
          "device_seconds_per_batch": round(statistics.median(seconds), 4)}


def _time_streams(iterators: dict[str, Any], steps: int, warmup: int
                  ) -> dict[str, tuple[dict, list[float]]]:
  """Reads every stream at once, each on its own thread, as training does.

  Each thread times `steps` batches after `warmup` untimed ones, then keeps reading
  (untimed) until every stream is done, so no stream is timed alone on the machine.
  Returns {stream: (first batch, seconds per timed batch)}.
  """
  import threading  # pylint: disable=g-import-not-at-top
  results, errors = {}, []
  lock = threading.Lock()
  pending = [len(iterators)]  # streams still timing

  def read(name, iterator):
    try:
      first = next(iterator)  # worker start-up, label-info table, first batch
      results[name] = (first, time_steps(lambda: next(iterator), steps, warmup=warmup))
    except BaseException as error:  # pylint: disable=broad-except  (raised below)
      errors.append(error)
    with lock:
      pending[0] -= 1
    try:
      while pending[0] and not errors:
        next(iterator)
    except BaseException as error:  # pylint: disable=broad-except
      errors.append(error)

  threads = [threading.Thread(target=read, args=item, daemon=True)
             for item in iterators.items()]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  if errors:
    raise errors[0]
  return results


def _prepared_size(iterator) -> list[int] | None:
  """[width, height] of a stream's frames when prepared at a training size, else None."""
  source = getattr(getattr(iterator, "_make_batch", None), "source", None)
  size = getattr(source, "image_size", None)
  return list(size) if size else None


def run_data(args: argparse.Namespace) -> dict[str, Any]:
  """Batches/s of the stage-2 input: read, decode, resize, jitter, batch (uint8;
  normalisation runs on the device), of each stream, both at once by default (a stage-2
  step takes one batch of each; each stream has its own `--workers`)."""
  from fada_jax import config_lib
  from fada_jax.data import pipeline
  from fada_jax.errors import UserError

  if args.steps_per_second is not None and args.steps_per_second <= 0:
    raise SystemExit(f"error: --steps-per-second={args.steps_per_second} must be positive")
  task, streams = _DATA_STREAMS[args.dataset]
  if args.generate and task != "g2c":
    raise SystemExit(f"error: --generate writes GTA5 and Cityscapes frames; --dataset="
                     f"{args.dataset} reads none")
  config = config_lib.make_config(task, "adversarial")
  config.data.format = args.format
  config.data.workers = args.workers
  config.data.jitter_first = not args.jitter_after_resize
  config.data.resize_on_device = "on" if args.resize_on_device else "off"
  config.solver.batch_size = 2 * args.batch  # each stream gets half
  iterators = {}
  try:
    config.data.root = (generate_data(args.generate, args.generate_frames,
                                      args.format == "array_record",
                                      uncompressed_images=args.uncompressed_images)
                        if args.generate else args.data_root)
    for stream in streams:
      iterators[stream] = (pipeline.source_loader if stream == "source"
                           else pipeline.target_loader)(config)
    # Batches grain read ahead while the workers started would come for free: drain its
    # buffers (2 per worker, 2 without) first, so the timed steps run at production rate.
    timed = _time_streams(iterators, args.steps, warmup=2 * max(args.workers, 1))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  finally:
    for iterator in iterators.values():
      iterator.close()
  stats = {stream: _stream_stats(first, times, args.batch, args.workers,
                                 _prepared_size(iterators[stream]))
           for stream, (first, times) in timed.items()}
  for stream, (first, _) in timed.items():
    stats[stream].update(_device_finish_stats(first))
  # A step needs a batch of every stream: the input's step rate is the slowest stream's.
  steps_per_second = min(s["batches_per_second"] for s in stats.values())
  result = {"mode": "data", "dataset": args.dataset, "format": args.format,
            "generated": bool(args.generate), "workers": args.workers,
            "batch": args.batch, "jitter_first": bool(config.data.jitter_first),
            "resize_on_device": args.resize_on_device}
  if len(stats) == 1:
    result.update(next(iter(stats.values())))
  else:
    result.update({"streams": stats, "batches_per_second": steps_per_second,
                   "images_per_second": round(sum(s["images_per_second"]
                                                  for s in stats.values()), 3)})
  if args.steps_per_second is not None:
    result["steps_per_second"] = args.steps_per_second
    result["sustains"] = steps_per_second >= args.steps_per_second
  return result


register_mode("data", _add_data_arguments, run_data)


# ----------------------------------------------------------------------------- train


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--backend", choices=("jax", "torch"), default="jax")
  parser.add_argument("--arch", default="resnet101",
                      choices=("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"))
  parser.add_argument("--stage", choices=("adversarial", "source_only", "self_distill"),
                      default="adversarial")
  parser.add_argument("--width", type=int, default=64, help="ResNet base width (64 = published)")
  parser.add_argument("--num-classes", type=int, default=19)
  parser.add_argument("--target-size", type=parse_size, default=None,
                      help="stage 2 target WIDTHxHEIGHT (default: --size)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--remat", action="store_true", help="rematerialise backbone blocks")
  parser.add_argument("--freeze-bn", choices=("true", "false"), default="true")
  parser.add_argument("--matmul-convs", choices=("auto", "on", "off"), default="auto",
                      help="jax: convolution weight gradients (and 1x1 / narrow convs) as "
                           "matrix products (auto = on for CPU; see "
                           "fada_jax/models/conv_dispatch.py)")
  parser.add_argument("--memory", action="store_true",
                      help="jax: add XLA's memory analysis of the compiled step")
  parser.add_argument("--compile-only", action="store_true",
                      help="jax: compile (for --memory and the FLOP count) without running")
  parser.add_argument("--dump-hlo", metavar="FILE", default=None,
                      help="jax: write the compiled step's optimised HLO text to FILE")
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                      help="torch intra-op threads (JAX on CPU uses every core)")


def _train_batch_shapes(args) -> dict[str, tuple[int, ...]]:
  width, height = args.size
  if args.stage != "adversarial":
    return {"image": (args.batch, height, width, 3), "label": (args.batch, height, width)}
  if args.batch % 2:
    raise SystemExit(f"--batch={args.batch}: stage 2 splits it into equal source and "
                     "target halves, so it must be even")
  target_width, target_height = args.target_size or args.size
  half = args.batch // 2
  return {"source_image": (half, height, width, 3), "source_label": (half, height, width),
          "target_image": (half, target_height, target_width, 3)}


def _train_jax(args: argparse.Namespace) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fada_jax import config_lib, models  # pylint: disable=g-import-not-at-top
  from fada_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from fada_jax.train import parallel, state as state_lib, steps  # pylint: disable=g-import-not-at-top
  config = config_lib.make_config("g2c", args.stage, args.arch)
  config.model.width = args.width
  config.model.num_classes = args.num_classes
  config.model.dtype = args.dtype
  config.model.remat = args.remat
  config.model.freeze_bn = args.freeze_bn == "true"
  config.solver.batch_size = args.batch
  network = models.build(config)
  mesh = parallel.make_mesh()
  try:
    parallel.local_batch_sizes(config, mesh)
  except UserError as error:
    raise SystemExit(f"error: {error}")
  matmul_convs = {"auto": None, "on": True, "off": False}[args.matmul_convs]

  def make_state():
    variables = models.init_variables(network, jax.random.PRNGKey(0), config)
    return state_lib.create_train_state(config, network, variables, jax.random.PRNGKey(1))

  abstract_state = jax.eval_shape(make_state)
  shardings = parallel.state_sharding(abstract_state, mesh)
  step = parallel.jit_step(steps.make_step(config, network, abstract_state, matmul_convs),
                           mesh, shardings, steps.compiler_options(config, matmul_convs))
  shapes = _train_batch_shapes(args)
  batch_sharding = parallel.batch_sharding(mesh)
  # Images and labels are uint8, as the data pipeline feeds them (normalised in the step).
  abstract_batch = {k: jax.ShapeDtypeStruct(s, jnp.uint8, sharding=batch_sharding)
                    for k, s in shapes.items()}
  abstract_state = jax.tree_util.tree_map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      abstract_state, shardings)
  start = time.perf_counter()
  compiled = step.lower(abstract_state, abstract_batch).compile()
  compile_seconds = time.perf_counter() - start
  if args.dump_hlo:
    with open(args.dump_hlo, "w") as hlo_file:
      hlo_file.write(compiled.as_text())
  result: dict[str, Any] = {"devices": jax.device_count(),
                            "platform": jax.devices()[0].platform, "dtype": args.dtype,
                            "remat": args.remat, "compile_seconds": round(compile_seconds, 2)}
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  result["flops_per_step"] = float(cost.get("flops", float("nan"))) if cost else None
  # XLA counts a loop body once, so with remat (blocks scanned) the compiled count misses
  # most of the backbone. The model's FLOPs (no recomputation, as MFU counts them) are
  # those of the same step unrolled, only lowered: no second compilation.
  result["model_flops_per_step"] = result["flops_per_step"]
  if args.remat:
    unrolled = config.copy_and_resolve_references()
    unrolled.model.remat = False
    unrolled_network = models.build(unrolled)
    unrolled_step = parallel.jit_step(
        steps.make_step(unrolled, unrolled_network, abstract_state, matmul_convs), mesh,
        shardings, steps.compiler_options(unrolled, matmul_convs))
    model_cost = unrolled_step.lower(abstract_state, abstract_batch).cost_analysis()
    model_cost = model_cost[0] if isinstance(model_cost, (list, tuple)) else model_cost
    result["model_flops_per_step"] = (float(model_cost.get("flops", float("nan")))
                                      if model_cost else None)
  if args.memory:
    result.update(_memory_analysis(compiled))
  if args.compile_only:
    result["step_seconds"] = []
    return result
  rng = np.random.default_rng(0)
  local = {}
  for key, shape in shapes.items():
    if "label" in key:
      labels = rng.integers(0, args.num_classes, shape).astype(np.uint8)
      labels[rng.random(shape) < 0.1] = 255
      local[key] = labels
    else:
      local[key] = rng.integers(0, 256, shape, dtype=np.uint8)
  batch = parallel.shard_batch(local, mesh)
  holder = {"state": jax.device_put(jax.jit(make_state)(), shardings)}

  def run_step():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics)

  result["step_seconds"] = [round(t, 4) for t in time_steps(run_step, args.steps)]
  return result


def _train_torch(args: argparse.Namespace) -> dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, _TORCH_REFERENCE)
  import torch_reference  # pylint: disable=g-import-not-at-top
  if args.stage != "adversarial" or args.memory or args.compile_only or args.dtype != "float32":
    raise SystemExit("--backend=torch times the float32 stage-2 step only")
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  trainer = torch_reference.AdversarialTrainer(int(args.arch[len("resnet"):]),
                                               args.num_classes, args.width)
  shapes = _train_batch_shapes(args)
  source = torch.randint(0, 256, shapes["source_image"], dtype=torch.uint8)
  target = torch.randint(0, 256, shapes["target_image"], dtype=torch.uint8)
  labels = torch.randint(0, args.num_classes, shapes["source_label"])
  labels[torch.rand(shapes["source_label"]) < 0.1] = 255
  times = time_steps(lambda: trainer.step(_torch_normalize(source), labels,
                                          _torch_normalize(target)), args.steps)
  return {"devices": 1, "platform": "cpu", "threads": torch.get_num_threads(),
          "dtype": "float32", "flops_per_step": None,
          "step_seconds": [round(t, 4) for t in times]}


def run_train(args: argparse.Namespace) -> dict[str, Any]:
  result = (_train_jax if args.backend == "jax" else _train_torch)(args)
  times = result["step_seconds"]
  median = statistics.median(times) if times else None
  return dict({"mode": "train", "backend": args.backend, "arch": args.arch,
               "stage": args.stage, "batch": args.batch,
               "size": f"{args.size[0]}x{args.size[1]}",
               "target_size": "x".join(map(str, args.target_size or args.size)),
               "step_seconds_median": round(median, 4) if median else None,
               "images_per_second": round(args.batch / median, 4) if median else None},
              **result)


register_mode("train", _add_train_arguments, run_train)


# ----------------------------------------------------------------------------- predict


def _add_predict_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--arch", default="resnet101",
                      help="resnet18/34/50/101/152 or vgg16 (random weights)")
  parser.add_argument("--width", type=int, default=64, help="ResNet base width (64 = published)")
  parser.add_argument("--test-size", type=parse_size, default=(1024, 512),
                      help="WIDTHxHEIGHT the frames are resized to (config.data.test_size)")
  parser.add_argument("--frames", type=int, default=4, help="generated frames of --size")
  parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")


def run_predict(args: argparse.Namespace) -> dict[str, Any]:
  """`--mode=predict` against `--mode=eval` on the same generated Cityscapes-layout frames
  of --size: each whole run (checkpoint load, reading, resizing, prediction at --test-size,
  upsampling to --size, and predict's three PNGs per frame and classes.csv; eval's
  metrics), after one warm-up run of each that compiles, then --steps rounds of the two
  alternately. images/s are frames over the median run time."""
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from fada_jax import checkpoint, config_lib, evaluate  # pylint: disable=g-import-not-at-top
  from fada_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from fada_jax.evaluate import predict  # pylint: disable=g-import-not-at-top
  scratch = args.workdir or tempfile.mkdtemp(prefix="fada_predict_benchmark_")
  config = config_lib.make_config("g2c", "source_only", args.arch)
  config.model.width = args.width
  config.data.root = os.path.join(scratch, "data")
  config.data.test_size = args.test_size
  config.data.workers = 0
  config.eval.batch_size = args.batch
  synthetic.write_synthetic_folders(config.data.root, 0, 0, args.frames, image_size=args.size,
                                    city="bench")
  model = os.path.join(scratch, "model")
  variables = _random_variables(config)
  checkpoint.save_model(model, {k: variables[k] for k in ("feature_extractor", "classifier")},
                        {"arch": args.arch, "num_classes": 19, "kind": "fada",
                         "source": "benchmark"}, overwrite=True)
  frames = os.path.join(config.data.root, "cityscapes", "leftImg8bit", "val")
  runs = {"eval": [], "predict": []}

  def run(kind: str, index: int) -> float:
    start = time.perf_counter()
    if kind == "eval":
      evaluate.evaluate_checkpoint(config, model, os.path.join(scratch, f"eval{index}"))
    else:
      summary = predict.run_predict(config, model, frames, os.path.join(scratch, f"pred{index}"))
      assert summary.predicted == args.frames, summary.line()
    return time.perf_counter() - start

  for kind in runs:  # warm-up: compiles
    run(kind, -1)
  for index in range(args.steps):
    for kind in runs:
      runs[kind].append(run(kind, index))
  result = {"devices": jax.device_count(), "platform": jax.devices()[0].platform,
            "frames": args.frames, "size": list(args.size), "test_size": list(args.test_size),
            "load_average": [round(v, 2) for v in os.getloadavg()]}
  for kind, seconds in runs.items():
    result[f"{kind}_run_seconds"] = [round(t, 2) for t in seconds]
    result[f"{kind}_images_per_second"] = round(args.frames / statistics.median(seconds), 4)
  return result


register_mode("predict", _add_predict_arguments, run_predict)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  probe = argparse.ArgumentParser(add_help=False)
  probe.add_argument("--mode", choices=sorted(_MODES))
  mode = probe.parse_known_args(argv)[0].mode
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--mode", choices=sorted(_MODES), required=True)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--size", type=parse_size, default=(1024, 512), help="WIDTHxHEIGHT")
  parser.add_argument("--steps", type=int, default=3, help="timed steps after warm-up")
  parser.add_argument("--json", action="store_true", help="print one JSON line")
  if mode is not None:
    _MODES[mode][0](parser)
  args = parser.parse_args(argv)
  if args.batch < 1 or args.steps < 1:
    parser.error("--batch and --steps must be positive")
  result = _MODES[args.mode][1](args)
  if args.json:
    print(json.dumps(result), flush=True)
  else:
    for key, value in result.items():
      print(f"{key:>22}: {value}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
