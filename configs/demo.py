"""The synthetic domain shift demo: a small ResNet on generated street scenes.

Needs no download. Trained alone, this config runs the adversarial stage from random
initialisation (the quick experiment); with `--mode=pipeline` it runs all three stages.
Parameter: the stage, e.g. `--config=configs/demo.py:source_only`.
"""

from fada_jax import config_lib


def get_config(stage: str | None = None):
  return config_lib.make_config('demo', stage or 'adversarial', 'resnet18')
