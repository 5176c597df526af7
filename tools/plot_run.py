"""Curves of training runs as one PNG: the command line of fada_jax.report.

  python tools/plot_run.py WORKDIR [WORKDIR ...] [--output=PNG]

Losses, learning rates and val mIoU against the step, one panel each, the runs overlaid;
a pipeline's folder stands for its three stages. Default output: WORKDIR/curves.png.
"""

import sys

from fada_jax import report

if __name__ == "__main__":
  sys.exit(report.main(sys.argv[1:]))
