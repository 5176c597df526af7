"""`--mode=pipeline`: FADA's whole schedule in one command, resumable at any point.

  stage 1  source_only   (init: config.init_checkpoint, ImageNet; '' = random)  -> eval
  stage 2  adversarial   (init: stage 1's final checkpoint)                      -> eval
  pseudo labels of the stage-2 model on the target training split (config.pseudo_label)
  stage 3  self_distill  (init: config.init_checkpoint again, or with none, stage 2's
                         final checkpoint; trained on the pseudo labels)        -> eval

Each stage trains in its own folder, DIR/{source_only,adversarial,self_distill}, with
the config `config_lib.make_config(task, stage, arch)` of that stage. What the user's
config says about the experiment carries into every stage: the fields of
`config_lib.SHARED_FIELDS`, and every field the user changed from the defaults of the
config they passed (command-line overrides such as `--config.solver.max_iter=100`),
except the fields that tie a config to its stage (the stage itself, its initialisation,
its labelled data).

Rerunning the same command continues where it stopped: a stage whose final checkpoint is
evaluated is skipped, an interrupted stage resumes from its newest checkpoint, and the
pseudo labels count only once their folder is complete (written under a temporary name,
then renamed) and made by the same model and config.pseudo_label. After every stage the
target mIoU so far is printed as a table, DIR/summary.json is rewritten:
  {"source_only": {"miou", "iou_per_class", "class_names", "checkpoint"}, "adversarial": ..., ...}
and DIR/curves.png drawn (`report`: every stage's losses, learning rates and val mIoU).
At the end DIR/summary.png shows the first target frames as predicted after each stage
(evaluate/summary_sheet.py).

Each stage hands its final model on, as the release does; config.pipeline.use_best=True
hands on its best validated model (DIR/<stage>/checkpoints/best) instead.
"""

import json
import os
import pathlib
import shutil
from typing import Any

from fada_jax import checkpoint as checkpoint_lib
from fada_jax import config_lib
from fada_jax import report
from fada_jax.constants import STAGES
from fada_jax.errors import UserError
from fada_jax.train import distributed
from fada_jax.train import loop
from fada_jax.train import preflight

PSEUDO_LABEL_DIR = 'pseudo_labels'
PSEUDO_LABEL_MARKER = 'complete.json'
SUMMARY_FILE = 'summary.json'
# Fields that belong to one stage: never carried from the user's config into another.
STAGE_FIELDS = ('task', 'stage', 'init_checkpoint', 'data.source', 'data.pseudo_label_dir')


def _flatten(config, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if hasattr(value, 'items'):
      out.update(_flatten(value, f'{name}.'))
    else:
      out[name] = value
  return out


def _set(config, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split('.')
  for key in parents:
    config = config[key]
  config[leaf] = value


def carried_fields(config) -> dict[str, Any]:
  """The fields of the user's config that every stage of the pipeline takes."""
  try:
    defaults = _flatten(config_lib.make_config(config.task, config.stage, config.model.arch))
  except (AttributeError, KeyError, ValueError) as e:
    raise UserError(f'--mode=pipeline needs a config of config_lib\'s tasks: {e}') from None
  given = _flatten(config)
  carried = {name: given[name] for name in config_lib.SHARED_FIELDS if name in given}
  for name, value in given.items():
    if name in STAGE_FIELDS or name not in defaults:
      continue
    if value != defaults[name]:
      carried[name] = value
  return carried


def stage_config(config, stage: str, *, init_checkpoint: str, pseudo_label_dir: str = ''):
  """The config of one pipeline stage (see the module docstring)."""
  stage_cfg = config_lib.make_config(config.task, stage, config.model.arch)
  for name, value in carried_fields(config).items():
    try:
      _set(stage_cfg, name, value)
    except (KeyError, AttributeError):
      continue  # a field this stage does not have
    except TypeError as e:
      raise UserError(f'config.{name}={value!r} does not fit stage {stage}: {e}') from None
  stage_cfg.init_checkpoint = init_checkpoint
  if stage == 'self_distill':
    stage_cfg.data.pseudo_label_dir = pseudo_label_dir
  config_lib.validate(stage_cfg)
  return stage_cfg


def _final_checkpoint(stage_cfg, stage_dir: pathlib.Path) -> pathlib.Path:
  return stage_dir / loop.CHECKPOINTS_DIR / str(int(stage_cfg.solver.stop_iter))


def _handed_on(config, stage_cfg, stage_dir: pathlib.Path) -> pathlib.Path:
  """The model a stage hands to the next step: its final or its best checkpoint."""
  if config.pipeline.use_best:
    return checkpoint_lib.best_checkpoint(stage_dir / loop.CHECKPOINTS_DIR)
  return _final_checkpoint(stage_cfg, stage_dir)


def _finished_metrics(stage_cfg, stage_dir: pathlib.Path) -> dict | None:
  """The stage's evaluation if it finished training and was evaluated, else None."""
  metrics_path = stage_dir / loop.EVAL_DIR / loop.EVAL_METRICS_FILE
  final = _final_checkpoint(stage_cfg, stage_dir)
  if not metrics_path.is_file() or not (final / checkpoint_lib.META_FILE).is_file():
    return None
  try:
    metrics = json.loads(metrics_path.read_text())
  except (OSError, json.JSONDecodeError):
    return None
  if pathlib.Path(metrics.get('checkpoint', '')).absolute() != final.absolute():
    return None
  return metrics


def _run_stage(stage_cfg, stage_dir: pathlib.Path) -> dict:
  metrics = _finished_metrics(stage_cfg, stage_dir)
  if metrics is not None:
    _print(f'{stage_cfg.stage}: finished earlier ({_final_checkpoint(stage_cfg, stage_dir)}), '
           'skipped')
    return metrics
  _print(f'{stage_cfg.stage}: training in {stage_dir}')
  return loop.train_and_evaluate(stage_cfg, stage_dir)


def _pseudo_labels(stage_cfg, checkpoint_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
  """Stage-2 predictions on the target training split into `out_dir`, atomically."""
  from fada_jax import evaluate  # pylint: disable=g-import-not-at-top
  marker = out_dir / PSEUDO_LABEL_MARKER
  made_by = {'checkpoint': str(checkpoint_dir),
             'keep_fraction': float(stage_cfg.pseudo_label.keep_fraction),
             'keep_confidence': float(stage_cfg.pseudo_label.keep_confidence)}
  if marker.is_file():
    try:
      written = json.loads(marker.read_text())
      if all(written.get(key) == value for key, value in made_by.items()):
        _print(f'pseudo labels: complete in {out_dir}, skipped')
        return
    except (OSError, json.JSONDecodeError):
      pass
  partial = out_dir.with_name(out_dir.name + '.partial')
  if distributed.is_main_process():
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
  distributed.barrier('fada_pseudo_labels_start')
  _print(f'pseudo labels: {checkpoint_dir} on {stage_cfg.data.target} train -> {out_dir}')
  variables, _ = checkpoint_lib.load_model(checkpoint_dir)
  metrics = evaluate.write_pseudo_labels(stage_cfg, variables, partial, 'train')
  _print(f'pseudo labels: {metrics["num_images"]} images, {100 * metrics["kept_fraction"]:.1f}% '
         'of the pixels labelled')
  distributed.barrier('fada_pseudo_labels_written')
  if distributed.is_main_process():
    checkpoint_lib.write_json_atomic(partial / PSEUDO_LABEL_MARKER, dict(
        made_by, num_images=metrics.get('num_images'),
        miou_against_labels=metrics.get('miou'), kept_fraction=metrics.get('kept_fraction')))
    if out_dir.exists():
      shutil.rmtree(out_dir)
    os.rename(partial, out_dir)
  distributed.barrier('fada_pseudo_labels_done')


def _print(message: str) -> None:
  if distributed.is_main_process():
    print(message, flush=True)


def format_summary(summary: dict) -> str:
  lines = [f'{"stage":<16}{"target mIoU":>12}']
  for stage in STAGES:
    miou = summary.get(stage, {}).get('miou')
    lines.append(f'{stage:<16}{"-" if miou is None else f"{100 * miou:.2f}":>12}')
  return '\n'.join(lines)


def _record(summary: dict, stage: str, metrics: dict, workdir: pathlib.Path) -> None:
  summary[stage] = {key: metrics[key] for key in
                    ('miou', 'iou_per_class', 'class_names', 'miou_13', 'checkpoint')
                    if key in metrics}
  if distributed.is_main_process():
    checkpoint_lib.write_json_atomic(workdir / SUMMARY_FILE, loop.jsonable(summary))
    report.plot_runs([workdir], workdir / report.CURVES_FILE)
    print('\n' + format_summary(summary) + '\n', flush=True)


def run_pipeline(config, workdir: str | os.PathLike) -> dict:
  """Stage 1 -> eval -> stage 2 -> eval -> pseudo labels -> stage 3 -> eval; returns the summary."""
  workdir = pathlib.Path(workdir).absolute()
  distributed.check_same_config(config, extra=str(workdir))
  imagenet = config.init_checkpoint
  source_dir = workdir / 'source_only'
  adversarial_dir = workdir / 'adversarial'
  pseudo_dir = workdir / PSEUDO_LABEL_DIR
  source_cfg = stage_config(config, 'source_only', init_checkpoint=imagenet)
  adversarial_cfg = stage_config(
      config, 'adversarial',
      init_checkpoint=str(_handed_on(config, source_cfg, source_dir)))
  # The release restarts stage 3 from ImageNet weights. Without them (the demo) a random
  # start only relearns a worse copy of its teacher, so stage 2's model is the start.
  distill_init = imagenet or str(_handed_on(config, adversarial_cfg, adversarial_dir))
  distill_cfg = stage_config(config, 'self_distill', init_checkpoint=distill_init,
                             pseudo_label_dir=str(pseudo_dir))
  if config.pipeline.use_best:
    for stage_cfg in (source_cfg, adversarial_cfg):
      every, stop_iter = int(stage_cfg.eval.every), int(stage_cfg.solver.stop_iter)
      if not 0 < every <= stop_iter:
        raise UserError(f'config.pipeline.use_best=True needs validation in stage '
                        f'{stage_cfg.stage}, but config.eval.every={every} validates no '
                        f'step up to its config.solver.stop_iter={stop_iter}')
  # Every stage's data and settings, before the first one writes or compiles anything.
  preflight.check_pipeline(
      workdir, {'source_only': source_cfg, 'adversarial': adversarial_cfg,
                'self_distill': distill_cfg},
      first_stage_started=preflight.resuming(source_dir, loop.CHECKPOINTS_DIR))
  if distributed.is_main_process():
    workdir.mkdir(parents=True, exist_ok=True)
  summary: dict = {}

  _record(summary, 'source_only', _run_stage(source_cfg, source_dir), workdir)
  _record(summary, 'adversarial', _run_stage(adversarial_cfg, adversarial_dir), workdir)
  _pseudo_labels(adversarial_cfg, _handed_on(config, adversarial_cfg, adversarial_dir),
                 pseudo_dir)
  _record(summary, 'self_distill', _run_stage(distill_cfg, workdir / 'self_distill'), workdir)
  _summary_sheet(distill_cfg, summary, workdir)
  return summary


def _summary_sheet(config, summary: dict, workdir: pathlib.Path) -> None:
  """DIR/summary.png: the first target frames as predicted after each stage."""
  from fada_jax.evaluate import summary_sheet  # pylint: disable=g-import-not-at-top
  models = [summary_sheet.Model(stage, summary[stage]['checkpoint'], summary[stage]['miou'])
            for stage in STAGES if stage in summary]
  path = summary_sheet.write_summary_sheet(config, models, workdir / summary_sheet.SUMMARY_IMAGE)
  _print(f'summary sheet: {path}')
