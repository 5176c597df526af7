#!/usr/bin/env python
"""Export a checkpoint's inference function as serialized StableHLO (jax.export).

  python tools/export.py --checkpoint=runs/g2c_sd/checkpoints/best --output=g2c_sd.jax
  python tools/export.py --checkpoint=weights/g2c_sd_r101 --config=configs/g2c_sd.py \
      --output=g2c_sd.jax [--size=2048x1024 | --size=symbolic]

See fada_jax/export.py for what the file holds and how to call it with plain jax.
Errors: one line on stderr, exit 2.
"""

import pathlib
import sys

try:
  from fada_jax import export
except ImportError:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from fada_jax import export

if __name__ == '__main__':
  sys.exit(export.main())
