"""`python -m fada_jax.main --mode=pipeline` end to end on the synthetic domain shift.

A tiny version of the demo (few steps, tiny network and frames) runs stage 1 -> eval ->
stage 2 -> eval -> pseudo labels -> stage 3 -> eval; a second run of the same command
finds everything done and redoes nothing.
"""

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from fada_jax import checkpoint as checkpoint_lib
from fada_jax import config_lib
from fada_jax import pipeline
from fada_jax.data import synthetic
from tiny_runs import REPO, TINY, environment, main_command, synthetic_target_val_miou

STAGES = ('source_only', 'adversarial', 'self_distill')
STEPS = 4
FRAMES = TINY['data.synthetic_size']
PIPELINE = {'solver.stop_iter': STEPS, 'solver.checkpoint_every': 2,
            'eval.save_predictions': True}


def _run_pipeline(workdir, cache_dir):
  env = environment(cache_dir)
  command = main_command('configs/demo.py', workdir, PIPELINE, mode='pipeline')
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)


def test_pipeline_runs_the_three_stages_and_resumes_as_done(tmp_path, cache_dir):
  workdir = tmp_path / 'demo'
  result = _run_pipeline(workdir, cache_dir)
  assert result.returncode == 0, result.stderr[-4000:]

  summary = json.loads((workdir / 'summary.json').read_text())
  assert sorted(summary) == sorted(STAGES)
  for stage in STAGES:
    # The mIoU of the masks that stage's evaluation wrote, counted independently.
    assert summary[stage]['miou'] == pytest.approx(
        synthetic_target_val_miou(workdir / stage / 'eval' / 'predictions'), abs=1e-9)
    assert len(summary[stage]['iou_per_class']) == 19
    # The table after each stage names it with its mIoU.
    assert f"{stage}" in result.stdout
  assert result.stdout.count('target mIoU') == 3

  for stage in STAGES:
    stage_dir = workdir / stage
    final = stage_dir / 'checkpoints' / str(STEPS)
    variables, meta = checkpoint_lib.load_model(final)
    assert meta['stage'] == stage and meta['step'] == STEPS
    expected_parts = ['classifier', 'feature_extractor'] + (
        ['discriminator'] if stage == 'adversarial' else [])
    assert sorted(variables) == sorted(expected_parts)
    records = [json.loads(line) for line in (stage_dir / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records] == [2, 4]
    assert all(np.isfinite(r['loss_seg']) and r['lr'] > 0 for r in records)
    assert list((stage_dir / 'tensorboard').glob('events.out.tfevents.*'))
    evaluation = json.loads((stage_dir / 'eval' / 'metrics.json').read_text())
    assert evaluation['miou'] == pytest.approx(summary[stage]['miou'])
    assert evaluation['checkpoint'] == str(final)

  # Stage 2 started from stage 1's final checkpoint, stage 3 (the demo has no ImageNet
  # weights) from stage 2's, on the stage-2 pseudo labels.
  adversarial_meta = json.loads(
      (workdir / 'adversarial' / 'checkpoints' / str(STEPS) / 'meta.json').read_text())
  assert adversarial_meta['config']['init_checkpoint'] == str(
      workdir / 'source_only' / 'checkpoints' / str(STEPS))
  distill_meta = json.loads(
      (workdir / 'self_distill' / 'checkpoints' / str(STEPS) / 'meta.json').read_text())
  assert distill_meta['config']['init_checkpoint'] == str(
      workdir / 'adversarial' / 'checkpoints' / str(STEPS))
  assert distill_meta['config']['data']['source'] == 'synthetic_target_pseudo'
  assert distill_meta['config']['data']['pseudo_label_dir'] == str(workdir / 'pseudo_labels')
  # Overrides given on the command line reach every stage.
  assert distill_meta['config']['model']['width'] == 4
  assert distill_meta['config']['solver']['stop_iter'] == STEPS

  labels = sorted((workdir / 'pseudo_labels').rglob('*.png'))
  assert len(labels) == FRAMES
  # At the target frames' full label resolution, as the release's pseudo labels.
  frame = synthetic.make_synthetic_source('target', 'train', 19, size=FRAMES, seed=0)[0]
  with Image.open(labels[0]) as image:
    assert image.mode == 'P' and image.size == frame['label'].shape[::-1]
    values = set(np.unique(np.asarray(image)).tolist())
  # The demo keeps the confident half of each class's pixels (config.pseudo_label).
  assert values <= set(range(19)) | {255} and len(values - {255}) > 0
  marker = json.loads((workdir / 'pseudo_labels' / 'complete.json').read_text())
  assert marker['checkpoint'] == str(workdir / 'adversarial' / 'checkpoints' / str(STEPS))
  assert marker['keep_fraction'] == 0.5 and 0.5 <= marker['kept_fraction'] < 1
  assert not (workdir / 'pseudo_labels.partial').exists()

  # Rerunning the command finds every stage finished and the pseudo labels complete.
  again = _run_pipeline(workdir, cache_dir)
  assert again.returncode == 0, again.stderr[-4000:]
  assert again.stdout.count('skipped') == 4, again.stdout
  assert json.loads((workdir / 'summary.json').read_text()) == summary


def test_stage_configs_carry_the_experiment_and_the_overrides():
  user = config_lib.make_config('demo', 'adversarial', 'resnet18')
  user.seed = 7
  user.solver.max_iter = 50
  user.solver.stop_iter = 20
  user.data.target_size = (64, 32)
  user.init_checkpoint = '/weights/imagenet'
  distill = pipeline.stage_config(user, 'self_distill', init_checkpoint='',
                                  pseudo_label_dir='/run/pseudo_labels')
  assert distill.stage == 'self_distill' and distill.seed == 7
  assert distill.solver.max_iter == 50 and distill.solver.stop_iter == 20
  assert tuple(distill.data.target_size) == (64, 32)
  assert distill.data.source == 'synthetic_target_pseudo'
  assert distill.data.pseudo_label_dir == '/run/pseudo_labels'
  assert distill.init_checkpoint == ''
  # Fields left at the user's stage defaults keep each stage's own values.
  reference = config_lib.make_config('demo', 'self_distill', 'resnet18')
  assert tuple(distill.data.color_jitter) == tuple(reference.data.color_jitter)
  assert distill.data.flip == reference.data.flip
  source = pipeline.stage_config(user, 'source_only', init_checkpoint='/weights/imagenet')
  assert source.init_checkpoint == '/weights/imagenet'
  assert tuple(source.data.color_jitter) == (0.0, 0.0, 0.0, 0.0)
