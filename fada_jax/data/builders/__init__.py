"""TFDS builders that prepare GTA5, SYNTHIA, Cityscapes and pseudo-labelled Cityscapes.

The builders turn the release's folder layouts (the TFDS "manual dir" is the data root)
into ArrayRecord files: the original encoded image bytes, the label mapped to train ids
and re-encoded as PNG, the frame's name and the set of classes it contains (the
label-info table of the class-balanced sampler). `fada_jax.data.prepared` reads them back.

This package is imported lazily: `tensorflow_datasets` loads only when a builder or
`prepare` is used, so the encode workers (`encode.py`) start quickly.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, attribute), resolved on first access (PEP 562).
_LAZY = {
    "Gta5": ("segmentation", "Gta5"),
    "Synthia": ("segmentation", "Synthia"),
    "Cityscapes": ("segmentation", "Cityscapes"),
    "CityscapesPseudo": ("segmentation", "CityscapesPseudo"),
    "make_builder": ("segmentation", "make_builder"),
    "prepare": ("preparation", "prepare"),
    "prepared_path": ("layout", "prepared_path"),
    "DATASET_SPLITS": ("layout", "DATASET_SPLITS"),
    "VERSION": ("layout", "VERSION"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
  if name not in _LAZY:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  module_name, attribute = _LAZY[name]
  module = importlib.import_module(f"{__name__}.{module_name}")
  return getattr(module, attribute)
