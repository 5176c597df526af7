"""FADA, GTA5 -> Cityscapes: stage 1, source-only training.

Parameter: the backbone, `resnet101` (default, published) or `vgg16`, e.g.
`--config=configs/g2c_src.py:vgg16`.
"""

from fada_jax import config_lib


def get_config(arch: str | None = None):
  return config_lib.make_config('g2c', 'source_only', arch or 'resnet101')
