"""Prepares the datasets as ArrayRecord files: the command line of fada_jax.data.prepare.

  python tools/prepare_data.py --data_root=ROOT [--datasets=...] [--workers=N] ...

`--help` lists the options; the module's docstring describes what is written where.
"""

import sys

from fada_jax.data import prepare

if __name__ == "__main__":
  sys.exit(prepare.main(sys.argv[1:]))
