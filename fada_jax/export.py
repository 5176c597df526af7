"""The whole inference function as serialized StableHLO (`jax.export`), to run without fada_jax.

    python tools/export.py --checkpoint=PATH [--config=CONFIG] --output=model.jax \
        [--size=WIDTHxHEIGHT | --size=symbolic] [--platforms=cpu,cuda]

The exported function takes uint8 RGB images [N, H, W, 3] at the network's input size (N
symbolic: any batch) and returns uint8 train ids [N, H, W]: normalisation, network
(batch norm folded, as in evaluation), align-corners upsampling of the logits to H x W,
argmax, and config.eval.flip / config.eval.scales: `Predictor._predict_impl`, the
computation `model.predict` runs, with the variables embedded as constants. H x W is
config.data.test_size unless `--size` says otherwise; `--size=symbolic` makes H and W
symbolic too (one file for any size whose height and width are multiples of 8; each new
size compiles on its first call; multi-scale inference needs a fixed size).
The test transform's bicubic resize to that size stays with the caller (PIL's
Image.resize(..., Image.BICUBIC) is what fada_jax does).

Beside FILE, FILE.json records the input size, class names and palette. Loading needs
jax alone:

    import jax, numpy as np
    exported = jax.export.deserialize(open('model.jax', 'rb').read())
    train_ids = np.asarray(exported.call(images))   # images: uint8 [N, H, W, 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence

import jax
import numpy as np

from fada_jax import api
from fada_jax import checkpoint as checkpoint_lib
from fada_jax.data import labels as labels_lib
from fada_jax.errors import UserError

SYMBOLIC = "symbolic"


def inference_function(model: api.Model):
  """uint8 [N, H, W, 3] -> uint8 [N, H, W] train ids, the model's variables as constants."""
  predictor = model.predictor
  variables = jax.tree_util.tree_map(np.asarray, jax.device_get(model.variables))

  def infer(images):
    return predictor._predict_impl(  # pylint: disable=protected-access
        variables, images, out_hw=images.shape[1:3])
  return infer


def export_model(model: api.Model, size: Sequence[int] | str | None = None,
                 platforms: Sequence[str] | None = None) -> jax.export.Exported:
  """`inference_function` exported with a symbolic batch; `size` (width, height) fixed
  (default config.data.test_size) or SYMBOLIC."""
  if size == SYMBOLIC:
    # Multiples of 8 (the network's output stride), so that the feature map's size is
    # an expression the shape checks can compare.
    input_shape = (*jax.export.symbolic_shape("n, 8*h, 8*w"), 3)
  else:
    width, height = (int(v) for v in (size or model.test_size))
    (batch,) = jax.export.symbolic_shape("n")
    input_shape = (batch, height, width, 3)
  try:
    return jax.export.export(jax.jit(inference_function(model)), platforms=platforms)(
        jax.ShapeDtypeStruct(input_shape, np.uint8))
  except Exception as e:  # pylint: disable=broad-except  (shape polymorphism errors vary)
    if size != SYMBOLIC:
      raise
    raise UserError(f"--size=symbolic: this network cannot be traced for a symbolic "
                    f"image size ({type(e).__name__}: {str(e).splitlines()[0]}); export a "
                    "fixed --size=WIDTHxHEIGHT") from None


def write_export(exported: jax.export.Exported, model: api.Model, output: str | os.PathLike,
                 size: Sequence[int] | str | None) -> pathlib.Path:
  """FILE (the serialized function) and FILE.json (what it expects and returns)."""
  output = pathlib.Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  checkpoint_lib.write_bytes_atomic(output, bytes(exported.serialize()))
  width, height = (None, None) if size == SYMBOLIC else (
      int(v) for v in (size or model.test_size))
  checkpoint_lib.write_bytes_atomic(output.with_name(output.name + ".json"), json.dumps({
      "input": "uint8 RGB [N, height, width, 3] (resize with bicubic to this size first)",
      "output": "uint8 train ids [N, height, width]",
      "height": height, "width": width,
      "platforms": list(exported.platforms),
      "flip": model.predictor.settings.flip,
      "scales": list(model.predictor.settings.scales),
      "class_names": list(model.class_names),
      "palette": labels_lib.palette(model.num_classes).tolist(),
      "checkpoint": str(model.checkpoint), "arch": str(model.config.model.arch),
  }, indent=2).encode())
  return output


def parse_size(text: str | None):
  if text is None or text == SYMBOLIC:
    return text
  try:
    width, height = (int(v) for v in text.lower().split("x"))
    if width <= 0 or height <= 0:
      raise ValueError
  except ValueError:
    raise UserError(f"--size={text}: expected WIDTHxHEIGHT (e.g. 1024x512) or "
                    f"{SYMBOLIC}") from None
  return width, height


def main(argv: list[str] | None = None) -> int:
  """CLI: `tools/export.py --checkpoint=PATH [--config=CONFIG] --output=FILE`."""
  parser = argparse.ArgumentParser(
      description="Export a checkpoint's inference function (uint8 images -> train ids) "
                  "as serialized StableHLO, to run with plain jax.")
  parser.add_argument("--checkpoint", required=True, help="a checkpoint folder")
  parser.add_argument("--config", default=None,
                      help="config file (configs/g2c_sd.py[:vgg16]); default: the config "
                           "recorded in the checkpoint")
  parser.add_argument("--output", required=True, help="file to write (and FILE.json)")
  parser.add_argument("--size", default=None,
                      help="WIDTHxHEIGHT of the input (default config.data.test_size), or "
                           "'symbolic' for any size")
  parser.add_argument("--platforms", default=None,
                      help="comma-separated subset of cpu,cuda,rocm,tpu (default: this "
                           "machine's backend)")
  args = parser.parse_args(argv)
  try:
    size = parse_size(args.size)
    model = api.load(args.checkpoint, config=args.config)
    platforms = args.platforms.split(",") if args.platforms else None
    exported = export_model(model, size, platforms)
    output = write_export(exported, model, args.output, size)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  shape = ", ".join(str(d) for d in exported.in_avals[0].shape)
  print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB): uint8[{shape}] -> "
        f"uint8 train ids, platforms {', '.join(exported.platforms)}", flush=True)
  return 0
