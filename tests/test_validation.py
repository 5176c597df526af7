"""Validation during training, the best checkpoint, and a clean exit.

The training runs go through `python -m fada_jax.main` (tiny_runs: 4 simulated CPU
devices, the tiny demo network, the session's compilation cache).
"""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from fada_jax import config_lib
from fada_jax import evaluate
from fada_jax import models as models_lib
from fada_jax.train import validation
from tiny_runs import REPO, TINY, environment, main_command

# Steps 2 and 4 validated and checkpointed; retention keeps only the newest step.
OVERRIDES = {'solver.max_iter': 6, 'solver.stop_iter': 4, 'solver.checkpoint_every': 2,
             'solver.keep_checkpoints': 1, 'eval.every': 2, 'data.workers': 2}
CONFIG = 'configs/demo.py:source_only'


def _run(command, env, timeout=600):
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _assert_clean_exit(result):
  assert result.returncode == 0, result.stderr[-3000:]
  for word in ('Warning', 'Traceback', 'leaked'):
    assert word not in result.stderr, result.stderr[-3000:]


def _rows(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_val_rows_best_checkpoint_retention_resume_and_a_clean_exit(tmp_path, cache_dir):
  env = environment(cache_dir)
  run = tmp_path / 'run'
  first = _run(main_command(CONFIG, run, OVERRIDES), env)
  _assert_clean_exit(first)

  val = [r for r in _rows(run) if 'val_miou' in r]
  assert [r['step'] for r in val] == [2, 4]
  names = evaluate.metrics_from_counts(np.zeros(19), np.zeros(19), np.zeros(19), 19)[
      'class_names']
  assert all(f'val_iou/{n}' in r for r in val for n in names)
  # The row of the final step is what --mode=eval's evaluation of that checkpoint says.
  final_eval = json.loads((run / 'eval' / 'metrics.json').read_text())
  assert final_eval['checkpoint'] == str(run / 'checkpoints' / '4')
  assert val[-1]['val_miou'] == final_eval['miou']
  assert val[-1]['val_macc'] == final_eval['macc']
  assert [val[-1][f'val_iou/{n}'] for n in names] == final_eval['iou_per_class']
  assert f'step 4: val mIoU {100 * val[-1]["val_miou"]:.2f}' in first.stdout + first.stderr

  best_step = max(val, key=lambda r: r['val_miou'])['step']  # the first of equals
  best_dir = run / 'checkpoints' / 'best'
  meta = json.loads((best_dir / 'meta.json').read_text())
  assert meta['step'] == best_step
  assert meta['val_miou'] == max(r['val_miou'] for r in val)
  assert val[-1]['val_best_step'] == best_step
  # Retention kept one step folder; 'best' is not a step to it.
  assert sorted(p.name for p in (run / 'checkpoints').iterdir()
                if not p.name.startswith('.')) == ['4', 'best']
  assert evaluate.find_checkpoints(run) == [run / 'checkpoints' / '4']

  # --mode=eval of checkpoints/best gives the val row of its step.
  evaluated = tmp_path / 'evaluated'
  command = main_command(CONFIG, evaluated, OVERRIDES, mode='eval')
  result = _run(command + [f'--checkpoint={best_dir}'], env)
  _assert_clean_exit(result)
  best_eval = json.loads((evaluated / 'eval' / 'metrics.json').read_text())
  assert best_eval['miou'] == next(r for r in val if r['step'] == best_step)['val_miou']

  # Resume keeps the record: a record no later model can beat (mIoU 1.0) must survive.
  meta['val_miou'] = 1.0
  (best_dir / 'meta.json').write_text(json.dumps(meta))
  resumed = _run(main_command(CONFIG, run, dict(OVERRIDES, **{'solver.stop_iter': 6})), env)
  _assert_clean_exit(resumed)
  val = [r for r in _rows(run) if 'val_miou' in r]
  assert [r['step'] for r in val] == [2, 4, 6]
  assert (val[-1]['val_best_miou'], val[-1]['val_best_step']) == (1.0, best_step)
  assert json.loads((best_dir / 'meta.json').read_text()) == meta


def test_resumed_record_ignores_the_lost_stretch(tmp_path):
  checkpoints = tmp_path / 'checkpoints'
  (checkpoints / 'best').mkdir(parents=True)
  rows = [{'step': 5, 'val_miou': 0.2}, {'step': 10, 'val_miou': 0.3},
          {'step': 15, 'val_miou': 0.5}, {'step': 20, 'val_miou': 0.1}]
  metrics = tmp_path / 'metrics.jsonl'
  metrics.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (checkpoints / 'best' / 'meta.json').write_text(json.dumps({'step': 15, 'val_miou': 0.5}))
  # Best written at or before the resumed step: it is the record.
  assert validation.resumed_best(checkpoints, metrics, 20) == {'step': 15, 'val_miou': 0.5}
  # Written after it (validation more often than checkpoints): the rows up to it decide.
  assert validation.resumed_best(checkpoints, metrics, 12) == {'step': 10, 'val_miou': 0.3}
  assert validation.resumed_best(checkpoints, metrics, 4) is None


def test_validation_compiles_once(tmp_path):
  config = config_lib.make_config('demo', 'source_only')
  with config.unlocked():
    for key, value in TINY.items():
      section, _, field = key.rpartition('.')
      (config[section] if section else config)[field] = value
    config.eval.every = 1
  models = models_lib.build(config)
  variables = jax.device_get(models_lib.init_variables(models, jax.random.PRNGKey(0), config))
  checker = validation.Validation(config, tmp_path / 'checkpoints', tmp_path / 'm.jsonl', 0)

  events = []

  def listener(name, *args, **kwargs):
    del args, kwargs
    events.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    checker.run(1, variables, {'arch': config.model.arch})
    jax.jit(lambda x: x * 3 + 1)(np.arange(7.0))  # the listener sees compilations
    assert any('compile' in name for name in events)
    events.clear()
    row = checker.run(2, variables, {'arch': config.model.arch})
    assert not [name for name in events if 'compile' in name]
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert row['val_best_step'] == 1  # the same model again is no improvement
  assert json.loads((tmp_path / 'checkpoints' / 'best' / 'meta.json').read_text())['step'] == 1


def test_plot_of_two_runs_and_a_pipeline_is_a_png(tmp_path):
  from fada_jax import report  # pylint: disable=g-import-not-at-top
  rows = {'a': [{'step': 2, 'loss_seg': 2.5, 'lr': 0.01},
                {'step': 2, 'val_miou': 0.1, 'val_macc': 0.2},
                {'step': 4, 'loss_seg': 2.0, 'lr': 0.005},
                {'step': 4, 'val_miou': 0.2, 'val_macc': 0.3}],
          'pipe/source_only': [{'step': 1, 'loss_seg': 3.0, 'lr': 0.01}],
          'pipe/adversarial': [{'step': 1, 'loss_seg': 1.0, 'loss_adv': 0.7, 'lr': 0.01,
                                'lr_d': 0.001}]}
  for name, run_rows in rows.items():
    (tmp_path / name).mkdir(parents=True)
    (tmp_path / name / 'metrics.jsonl').write_text(
        ''.join(json.dumps(r) + '\n' for r in run_rows) + '{"step": 6, "lo')  # a cut line
  assert [label for label, _ in report.find_runs(tmp_path / 'pipe')] == [
      'pipe/source_only', 'pipe/adversarial']
  assert report.series(report.read_rows(tmp_path / 'a' / 'metrics.jsonl'), 'val_miou') == {
      'val_miou': ([2, 4], [10.0, 20.0])}
  assert sorted(report.series(report.read_rows(tmp_path / 'pipe' / 'adversarial' /
                                               'metrics.jsonl'), 'lr')) == ['lr', 'lr_d']

  output = tmp_path / 'out' / 'curves.png'
  result = subprocess.run(
      [sys.executable, 'tools/plot_run.py', str(tmp_path / 'a'), str(tmp_path / 'pipe'),
       f'--output={output}'], cwd=REPO, env=environment(tmp_path), capture_output=True,
      text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stderr == ''
  data = output.read_bytes()
  assert data[:8] == b'\x89PNG\r\n\x1a\n'
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(output) as image:
    image.verify()
    assert image.size == (800, 900)

  missing = subprocess.run([sys.executable, 'tools/plot_run.py', str(tmp_path / 'none')],
                           cwd=REPO, env=environment(tmp_path), capture_output=True,
                           text=True, timeout=120)
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines() == [
      f'error: {tmp_path / "none"}: no metrics.jsonl (neither a training run\'s folder nor '
      'a pipeline\'s)']


def test_pipeline_hands_on_the_final_model_unless_use_best(tmp_path):
  from fada_jax import pipeline  # pylint: disable=g-import-not-at-top
  from fada_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  user = config_lib.make_config('demo', 'adversarial', 'resnet18')
  stage = pipeline.stage_config(user, 'source_only', init_checkpoint='')
  assert pipeline._handed_on(user, stage, tmp_path) == tmp_path / 'checkpoints' / '300'
  user.pipeline.use_best = True
  stage = pipeline.stage_config(user, 'source_only', init_checkpoint='')
  assert stage.pipeline.use_best  # carried into every stage
  assert pipeline._handed_on(user, stage, tmp_path) == tmp_path / 'checkpoints' / 'best'
  user.eval.every = 0
  with pytest.raises(UserError, match=r'^config.pipeline.use_best=True needs validation in '
                     r'stage source_only, but config.eval.every=0 validates no step up to '
                     r'its config.solver.stop_iter=300$'):
    pipeline.run_pipeline(user, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()
