#!/usr/bin/env python
"""Convert PyTorch weights into a fada_jax model checkpoint folder.

  python tools/convert_torch_weights.py --input resnet101-5d3b4d8f.pth \
      --output weights/resnet101_imagenet --arch resnet101
  python tools/convert_torch_weights.py --input g2c_tgt_self_distill_r101_model_iter018000.pth \
      --output weights/g2c_sd_r101 --arch resnet101 [--num-classes 19]

Reads torchvision ImageNet ResNet / VGG-16 state dicts and FADA training checkpoints with
torch's weights-only loader; see fada_jax/convert.py. Errors: one line on stderr, exit 2.
"""

import pathlib
import sys

try:
  from fada_jax import convert
except ImportError:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from fada_jax import convert

if __name__ == '__main__':
  sys.exit(convert.main())
