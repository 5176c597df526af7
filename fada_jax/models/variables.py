"""Whether loaded variables fit the config's network: the one check for every caller.

Training (`config.init_checkpoint`) and evaluation (a checkpoint, the pseudo-labelling
model) both compare a loaded part of the model (feature extractor, classifier) with the
variables the config's network would create, tensor by tensor, and name the first one
that does not fit, so that a checkpoint of another architecture, width or class count
fails at once with the tensor at fault rather than inside a compiled step.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from fada_jax.errors import UserError


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def _leaves(tree: Any) -> dict[str, Any]:
  return {_path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def describe_model(model_config) -> str:
  """The fields of config.model that decide the variables' shapes."""
  return (f"arch={model_config.arch}, width={int(model_config.get('width', 64))}, "
          f"num_classes={int(model_config.num_classes)}")


def check_fit(part: str, loaded: Any, expected: Any, where: str, model_config) -> None:
  """Raises a UserError unless `loaded` has exactly `expected`'s tensors and shapes.

  part: the model part both trees are ('feature_extractor', 'classifier', ...), named in
  the message; expected: the config's variables of that part (arrays or ShapeDtypeStructs,
  e.g. from jax.eval_shape); where: what `loaded` came from, e.g. 'checkpoint PATH'.
  """
  wanted, given = _leaves(expected), _leaves(loaded)
  prefix = f"{where} does not match config.model ({describe_model(model_config)}): {part}/"
  missing = sorted(set(wanted) - set(given))
  if missing:
    raise UserError(f"{prefix}{missing[0]} is missing ({len(missing)} tensor(s) of the "
                    "config's network are not in it; is it a checkpoint of another "
                    "architecture?)")
  extra = sorted(set(given) - set(wanted))
  if extra:
    raise UserError(f"{prefix}{extra[0]} is not a tensor of the config's network "
                    f"({len(extra)} unexpected tensor(s); is it a checkpoint of another "
                    "architecture?)")
  for name, value in wanted.items():
    shape = tuple(np.shape(given[name]))
    if shape != tuple(value.shape):
      raise UserError(f"{prefix}{name} has shape {shape}, the config's network needs "
                      f"{tuple(value.shape)}")


def fit(part: str, loaded: Any, expected: Any, where: str, model_config) -> Any:
  """`loaded` as host arrays with `expected`'s structure and dtypes, after `check_fit`."""
  check_fit(part, loaded, expected, where, model_config)
  given = _leaves(loaded)
  return jax.tree_util.tree_map_with_path(
      lambda path, value: np.asarray(given[_path_name(path)], dtype=value.dtype), expected)
