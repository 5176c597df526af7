"""FADA, SYNTHIA -> Cityscapes (16 classes): stage 2, fine-grained adversarial training.

Parameter: the backbone, `resnet101` (default, published) or `vgg16`, e.g.
`--config=configs/s2c_adv.py:vgg16`.
"""

from fada_jax import config_lib


def get_config(arch: str | None = None):
  return config_lib.make_config('s2c', 'adversarial', arch or 'resnet101')
