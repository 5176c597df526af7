"""Curves of training runs: one PNG with the losses, the learning rates and the val mIoU.

`plot_runs([DIR, ...], OUT)` reads each run's DIR/metrics.jsonl (the rows the training
loop writes, `train.loop`) and draws one panel per kind of value against the step, the
runs overlaid. A pipeline's folder stands for its stages (DIR/source_only, ...), each a
run of its own. The command line is `python tools/plot_run.py DIR [DIR ...]`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from fada_jax.constants import STAGES, TRAIN_METRICS_FILE
from fada_jax.errors import UserError

CURVES_FILE = 'curves.png'
PANELS = (('loss', 'loss'), ('learning rate', 'lr'), ('val mIoU (%)', 'val_miou'))


def find_runs(path: str | os.PathLike) -> list[tuple[str, pathlib.Path]]:
  """(label, metrics.jsonl) of the run at `path`, or of each stage of a pipeline there."""
  path = pathlib.Path(path)
  if (path / TRAIN_METRICS_FILE).is_file():
    return [(path.absolute().name, path / TRAIN_METRICS_FILE)]
  stages = [(f'{path.absolute().name}/{stage}', path / stage / TRAIN_METRICS_FILE)
            for stage in STAGES if (path / stage / TRAIN_METRICS_FILE).is_file()]
  if not stages:
    raise UserError(f'{path}: no {TRAIN_METRICS_FILE} (neither a training run\'s folder '
                    'nor a pipeline\'s)')
  return stages


def read_rows(metrics_path: pathlib.Path) -> list[dict]:
  rows = []
  for line in metrics_path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut short by a kill
    if isinstance(row, dict) and 'step' in row:
      rows.append(row)
  return rows


def series(rows: list[dict], prefix: str) -> dict[str, tuple[list[int], list[float]]]:
  """{name: (steps, values)} of the fields named `prefix` or `prefix...` (val_miou in %)."""
  out: dict[str, tuple[list[int], list[float]]] = {}
  for row in rows:
    for name, value in row.items():
      if not name.startswith(prefix) or not isinstance(value, (int, float)):
        continue
      if prefix == 'val_miou' and name != 'val_miou':
        continue
      steps, values = out.setdefault(name, ([], []))
      steps.append(int(row['step']))
      values.append(100 * float(value) if name == 'val_miou' else float(value))
  return out


def plot_runs(paths: list[str | os.PathLike], output: str | os.PathLike) -> pathlib.Path:
  """Writes the curves of the runs at `paths` to the PNG `output`; returns its path."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top

  runs = [run for path in paths for run in find_runs(path)]
  figure = Figure(figsize=(8, 3 * len(PANELS)), layout='constrained')
  FigureCanvasAgg(figure)
  axes = figure.subplots(len(PANELS), 1, sharex=True)
  for ax, (title, prefix) in zip(axes, PANELS):
    drawn = 0
    for label, metrics_path in runs:
      for name, (steps, values) in series(read_rows(metrics_path), prefix).items():
        name_label = label if prefix == 'val_miou' else f'{label} {name}'
        ax.plot(steps, values, marker='o' if prefix == 'val_miou' else None,
                markersize=3, linewidth=1, label=name_label)
        drawn += 1
    ax.set_ylabel(title)
    ax.grid(True, alpha=0.3)
    if drawn:
      ax.legend(fontsize='small')
    else:
      ax.text(0.5, 0.5, 'no values', transform=ax.transAxes, ha='center', va='center')
  axes[-1].set_xlabel('step')
  output = pathlib.Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  staging = output.with_name(f'.{output.name}.tmp')
  figure.savefig(staging, format='png', dpi=100)
  os.replace(staging, output)  # a reader never sees half a picture
  return output


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      prog='plot_run.py', description='One PNG of the losses, learning rates and val mIoU '
      'of one or several runs (a pipeline\'s folder stands for its stages).')
  parser.add_argument('workdirs', nargs='+', metavar='WORKDIR')
  parser.add_argument('--output', help=f'the PNG (default: FIRST_WORKDIR/{CURVES_FILE})')
  args = parser.parse_args(argv)
  output = args.output or str(pathlib.Path(args.workdirs[0]) / CURVES_FILE)
  try:
    written = plot_runs(args.workdirs, output)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(written)
  return 0
