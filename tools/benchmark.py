"""Throughput benchmarks of fada_jax, one `--mode` each.

  python tools/benchmark.py --mode=eval --arch=resnet101 --batch=1 --size=1024x512 --steps=3 --json
  python tools/benchmark.py --mode=eval --backend=torch ...   (the same network in PyTorch)
  python tools/benchmark.py --mode=data --dataset=gta5 --data_root=/data --workers=4 --batch=8 --steps=20 --json
  python tools/benchmark.py --mode=data --dataset=synthetic_source --workers=2 --steps-per-second=6 --json

`--mode=eval` times jit-compiled single-scale inference: a batch of WxH images -> logits
upsampled (align corners) to 2Wx2H (Cityscapes' label size for the 1024x512 test size)
-> argmax, after a warm-up step, and prints the median step time, images/s and the FLOPs
of a step from XLA's cost analysis of the compiled function. Weights are random: speed
does not depend on their values (no weights download needed). Images are uint8, as the
data pipeline feeds them: the timed step includes the normalisation on the device.

`--mode=data --steps-per-second=R` says whether the input path keeps up with a training
step rate R: the batches/s it produced over the timed steps and `sustains` (true when
that is at least R).

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


_DATA_STREAMS = {  # --dataset -> (config task, stream)
    "gta5": ("g2c", "source"), "cityscapes": ("g2c", "target"),
    "synthetic_source": ("demo", "source"), "synthetic_target": ("demo", "target"),
    "synthetic": ("demo", "source"),
}


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--dataset", choices=tuple(_DATA_STREAMS), default="gta5",
                      help="gta5: the stage-2 source path (1280x720, colour jitter); "
                      "cityscapes: the stage-2 target path (1024x512); synthetic_source, "
                      "synthetic_target (synthetic = synthetic_source): the demo's streams, "
                      "generated, no data needed")
  parser.add_argument("--steps-per-second", type=float, default=None,
                      help="the training step rate to sustain: adds 'sustains'")
  parser.add_argument("--data_root", default="", help="folder holding gta5/, cityscapes/")
  parser.add_argument("--workers", type=int, default=0, help="grain worker processes")
  parser.add_argument("--format", choices=("folder", "array_record"), default="folder")
  parser.add_argument("--jitter_after_resize", action="store_true",
                      help="jitter the resized frame (config.data.jitter_first=False)")


def run_data(args: argparse.Namespace) -> dict[str, Any]:
  """Batches/s of one stage-2 input stream: read, decode, resize, jitter, batch (uint8;
  normalisation runs on the device). A stage-2 step takes one batch of each stream, and
  each stream has its own `--workers`."""
  from fada_jax import config_lib
  from fada_jax.data import pipeline
  from fada_jax.errors import UserError

  if args.steps_per_second is not None and args.steps_per_second <= 0:
    raise SystemExit(f"error: --steps-per-second={args.steps_per_second} must be positive")
  task, stream = _DATA_STREAMS[args.dataset]
  config = config_lib.make_config(task, "adversarial")
  config.data.root = args.data_root
  config.data.format = args.format
  config.data.workers = args.workers
  config.data.jitter_first = not args.jitter_after_resize
  config.solver.batch_size = 2 * args.batch  # the source stream gets half
  iterator = None
  try:
    iterator = (pipeline.source_loader if stream == "source"
                else pipeline.target_loader)(config)
    first = next(iterator)  # worker start-up, label-info table, first batch
    # Batches grain read ahead while the workers started would come for free: drain its
    # buffers (2 per worker, 2 without) first, so the timed steps run at production rate.
    buffered = 2 * max(args.workers, 1)
    times = time_steps(lambda: next(iterator), args.steps, warmup=buffered)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  finally:
    if iterator is not None:
      iterator.close()
  median = statistics.median(times)
  batches_per_second = len(times) / sum(times)
  result = {"mode": "data", "dataset": args.dataset, "format": args.format,
            "workers": args.workers, "batch": args.batch,
            "jitter_first": bool(config.data.jitter_first),
            "image_shape": list(first["image"].shape),
            "image_dtype": str(first["image"].dtype),
            "bytes_per_batch": int(sum(v.nbytes for v in first.values())),
            "step_seconds_median": round(median, 4),
            "batches_per_second": round(batches_per_second, 3),
            "images_per_second": round(args.batch * batches_per_second, 3),
            "images_per_second_per_worker": round(
                args.batch * batches_per_second / max(args.workers, 1), 3)}
  if args.steps_per_second is not None:
    result["steps_per_second"] = args.steps_per_second
    result["sustains"] = batches_per_second >= args.steps_per_second
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
