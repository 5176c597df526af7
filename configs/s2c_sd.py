"""FADA, SYNTHIA -> Cityscapes (16 classes): stage 3, self-distillation on pseudo labels.

Parameter: the backbone, `resnet101` (default, published) or `vgg16`, e.g.
`--config=configs/s2c_sd.py:vgg16`.
"""

from fada_jax import config_lib


def get_config(arch: str | None = None):
  return config_lib.make_config('s2c', 'self_distill', arch or 'resnet101')
