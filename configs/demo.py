"""The synthetic domain shift demo: a small ResNet on generated street scenes.

Needs no download. Trained alone, this config runs the adversarial stage from random
initialisation (the quick experiment); with `--mode=pipeline` it runs all three stages.
Parameter: the stage, e.g. `--config=configs/demo.py:source_only`.

The demo chooses its own schedule and sizes (config_lib's demo part): a ResNet-18 of
width 16 with trainable batch norm from scratch, 160x80 frames, 300 steps a stage at base
rate 1e-2 (2e-2 in stage 3). Its stage 3 starts from stage 2's model and, unlike the
release, trains on crops at about the test scale without colour jitter, on class-balanced
confident pseudo labels (config.pseudo_label.keep_fraction 0.5); config_lib gives the
measured reasons.
"""

from fada_jax import config_lib


def get_config(stage: str | None = None):
  return config_lib.make_config('demo', stage or 'adversarial', 'resnet18')
