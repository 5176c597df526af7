"""The training loop: exact resume after SIGKILL or from the newest intact checkpoint,
divergence handling, initialisation.

Training runs go through `python -m fada_jax.main` in subprocesses (4 simulated CPU
devices, the tiny demo network), sharing a persistent compilation cache, so each step
function compiles once for the module.
"""

import json
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fada_jax import checkpoint as checkpoint_lib
from fada_jax import config_lib
from fada_jax import models as models_lib
from fada_jax.errors import UserError
from fada_jax.train import initialization, loop
from tiny_runs import (REPO, TINY, checkpoint_arrays, environment, main_command, set_fields,
                       synthetic_target_val_miou, truncate_arrays)



def _run(command, env, timeout=300):
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


# Checkpoints every 2 steps, the last two kept. A run killed at its first checkpoint
# (step 2) has 8 steps and an evaluation still to go.
STOP = 10
RESUME_OVERRIDES = {'solver.stop_iter': STOP, 'solver.checkpoint_every': 2,
                    'solver.keep_checkpoints': 2, 'eval.save_predictions': True}


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory, cache_dir):
  """The workdir of an uninterrupted tiny stage-2 run to STOP, which the resumed runs of
  this module must reproduce."""
  workdir = tmp_path_factory.mktemp('straight')
  result = _run(main_command('configs/demo.py', workdir, RESUME_OVERRIDES),
                environment(cache_dir))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_resume_after_sigkill_is_bitwise_identical(straight_run, tmp_path, cache_dir):
  """Kill -9 a run after its first checkpoint; the restarted run ends bit for bit where
  an uninterrupted run ends (parameters, BN statistics, optimiser states, step, RNG)."""
  env = environment(cache_dir)
  killed = tmp_path / 'killed'
  process = subprocess.Popen(main_command('configs/demo.py', killed, RESUME_OVERRIDES),
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  first = killed / 'checkpoints' / '2' / 'commit_success.txt'
  deadline = time.monotonic() + 300
  while not first.exists() and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  assert process.wait(timeout=60) == -signal.SIGKILL, 'the run ended before it was killed'
  assert not (killed / 'checkpoints' / str(STOP)).exists()
  # What a kill during a save leaves behind: orbax's temporary folder. Never read.
  junk = killed / 'checkpoints' / f'{STOP + 2}.orbax-checkpoint-tmp-1234'
  (junk / 'variables').mkdir(parents=True)
  (junk / 'variables' / 'garbage').write_text('half written')

  result = _run(main_command('configs/demo.py', killed, RESUME_OVERRIDES), env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resumed from' in result.stderr + result.stdout

  expected = checkpoint_arrays(straight_run / 'checkpoints' / str(STOP))
  actual = checkpoint_arrays(killed / 'checkpoints' / str(STOP))
  assert expected.keys() == actual.keys()
  differing = [k for k in expected if not np.array_equal(expected[k], actual[k])]
  assert not differing, f'{len(differing)} arrays differ, e.g. {differing[:3]}'
  assert int(expected["['train']['step']"]) == STOP

  # Old checkpoints are pruned to keep_checkpoints; the final one reads as a model.
  steps = sorted(int(p.name) for p in (killed / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps == [STOP - 2, STOP]
  variables, meta = checkpoint_lib.load_model(killed / 'checkpoints' / str(STOP))
  assert meta['format'] == checkpoint_lib.TRAIN_FORMAT and meta['step'] == STOP
  assert sorted(variables) == ['classifier', 'discriminator', 'feature_extractor']

  # The resumed run's log has every logged step exactly once, in order.
  records = [json.loads(line) for line in (killed / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == list(range(2, STOP + 1, 2))
  for key in ('loss_seg', 'loss_adv_tgt', 'loss_D', 'loss_D_src', 'loss_D_tgt', 'lr'):
    assert np.isfinite(records[-1][key]), key
  assert 'images_per_second' in records[-1] and 'step_time' in records[-1]
  # The final evaluation is of the final checkpoint: the mIoU of the masks it wrote.
  eval_metrics = json.loads((killed / 'eval' / 'metrics.json').read_text())
  assert eval_metrics['checkpoint'] == str(killed / 'checkpoints' / str(STOP))
  assert eval_metrics['miou'] == pytest.approx(
      synthetic_target_val_miou(killed / 'eval' / 'predictions'), abs=1e-9)


def test_a_run_resumes_from_the_newest_intact_checkpoint(straight_run, tmp_path, cache_dir):
  """The newest checkpoint of a run is truncated on disk: the rerun says so, resumes from
  the one before, and computes the damaged step again, bit for bit."""
  workdir = tmp_path / 'run'
  shutil.copytree(straight_run, workdir)
  newest = workdir / 'checkpoints' / str(STOP)
  expected = checkpoint_arrays(newest)
  truncate_arrays(newest)

  result = _run(main_command('configs/demo.py', workdir, RESUME_OVERRIDES),
                environment(cache_dir))
  assert result.returncode == 0, result.stderr[-3000:]
  output = result.stdout + result.stderr
  assert f'checkpoint {newest} is unreadable (' in output
  assert f'passed over and kept as {newest}.unreadable' in output
  assert f'resumed from {workdir}/checkpoints/{STOP - 2} (step {STOP - 2})' in output
  assert 'Traceback' not in output and 'Event loop is closed' not in output
  actual = checkpoint_arrays(newest)
  assert expected.keys() == actual.keys()
  assert all(np.array_equal(expected[k], actual[k]) for k in expected)
  assert (workdir / 'checkpoints' / f'{STOP}.unreadable' / 'train').is_dir()


def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                           cache_dir):
  workdir = tmp_path / 'run'
  result = _run(main_command('configs/demo.py:source_only', workdir,
                              {'solver.stop_iter': 20, 'solver.checkpoint_every': 1,
                               'solver.base_lr': 1e3}),
                environment(cache_dir))
  assert result.returncode == 2, result.stderr[-3000:]
  error = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(error) == 1, result.stderr[-3000:]
  message = error[0]
  assert 'diverged' in message and 'Traceback' not in result.stderr
  bad_step = int(message.split(' step ')[1].split()[0])
  good = checkpoint_lib.latest_training_checkpoint(workdir / 'checkpoints')
  assert good is not None and str(good) in message
  assert int(good.name) < bad_step
  assert not any(int(p.name) >= bad_step for p in (workdir / 'checkpoints').iterdir()
                 if p.name.isdigit())
  variables, _ = checkpoint_lib.load_model(good)
  assert all(np.all(np.isfinite(v)) for v in jax.tree_util.tree_leaves(variables))


def _tiny_config(stage, **overrides):
  config = config_lib.make_config('demo', stage)
  return set_fields(config, dict(TINY, **overrides))


def test_init_checkpoint_with_other_classes_is_one_clear_error(tmp_path):
  sixteen = _tiny_config('source_only', **{'model.num_classes': 16})
  models = models_lib.build(sixteen)
  abstract = jax.eval_shape(lambda r: models_lib.init_variables(models, r, sixteen),
                            jax.random.PRNGKey(0))
  zeros = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  path = checkpoint_lib.save_model(tmp_path / 'sixteen', zeros,
                                   {'arch': 'resnet18', 'num_classes': None, 'kind': 'fada'})

  config = _tiny_config('adversarial', init_checkpoint=str(path))
  with pytest.raises(UserError) as error:
    loop.train(config, tmp_path / 'run')
  message = str(error.value)
  assert 'classifier/params/conv_0' in message and '16' in message and '19' in message
  assert 'num_classes' in message

  # Another width: the feature extractor's shapes do not fit; the tensor is named.
  config = _tiny_config('adversarial', init_checkpoint=str(path), **{'model.width': 8,
                                                                     'model.num_classes': 16})
  with pytest.raises(UserError, match=r'feature_extractor/(params|batch_stats)/\S+ has shape'):
    loop.train(config, tmp_path / 'run2')


def test_init_checkpoint_parts_follow_the_release(tmp_path, capsys):
  """ImageNet fills the backbone; a FADA checkpoint the backbone and classifier, and in
  stage 2 also the discriminator when it holds one (a released stage-2 model continues);
  one printed line says what was loaded and what is fresh."""
  config = _tiny_config('adversarial')
  models = models_lib.build(config)
  rng = jax.random.PRNGKey(0)
  abstract = jax.eval_shape(lambda r: models_lib.init_variables(models, r, config), rng)
  marked = jax.tree_util.tree_map(lambda x: np.full(x.shape, 0.5, x.dtype), abstract)
  is_marked = lambda tree: all(np.all(np.asarray(v) == 0.5) for v in jax.tree_util.tree_leaves(tree))
  fresh = jax.device_get(models_lib.init_variables(models, rng, config))

  def is_fresh(part, tree):
    return all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(tree),
                                                    jax.tree_util.tree_leaves(fresh[part])))

  def initial(source, stage='adversarial'):
    config.init_checkpoint, config.stage = str(source), stage
    capsys.readouterr()
    variables = jax.device_get(initialization.initial_variables(config, models, rng))
    return variables, capsys.readouterr().out.splitlines()

  imagenet = checkpoint_lib.save_model(
      tmp_path / 'imagenet', {'feature_extractor': marked['feature_extractor']},
      {'arch': 'resnet18', 'num_classes': None, 'kind': 'imagenet'})
  variables, printed = initial(imagenet)
  assert is_marked(variables['feature_extractor'])
  assert is_fresh('classifier', variables['classifier'])
  assert is_fresh('discriminator', variables['discriminator'])
  assert printed == [f'initial variables: loaded feature_extractor from {imagenet}; '
                     'fresh classifier, discriminator']

  stage_one = checkpoint_lib.save_model(
      tmp_path / 'stage1', {k: marked[k] for k in ('feature_extractor', 'classifier')},
      {'arch': 'resnet18', 'num_classes': 19, 'kind': 'fada'})
  variables, printed = initial(stage_one)
  assert is_marked(variables['feature_extractor']) and is_marked(variables['classifier'])
  assert is_fresh('discriminator', variables['discriminator'])
  assert printed == [f'initial variables: loaded feature_extractor, classifier from '
                     f'{stage_one}; fresh discriminator']

  stage_two = checkpoint_lib.save_model(tmp_path / 'stage2', marked,
                                        {'arch': 'resnet18', 'num_classes': 19, 'kind': 'fada'})
  variables, printed = initial(stage_two)
  assert all(is_marked(variables[part]) for part in marked)
  assert printed == [f'initial variables: loaded feature_extractor, classifier, '
                     f'discriminator from {stage_two}']

  # Stage 3 restarts from it without a discriminator (it trains none).
  variables, printed = initial(stage_two, 'self_distill')
  assert is_marked(variables['feature_extractor']) and is_marked(variables['classifier'])
  assert printed == [f'initial variables: loaded feature_extractor, classifier from '
                     f'{stage_two}']

  variables, printed = initial('', 'source_only')
  assert printed == ['initial variables: fresh feature_extractor, classifier']


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
  """tensorboardX imports torch when it can; a training run's writer must not pay that."""
  script = f'''
import pathlib, struct, sys
from fada_jax.train import loop
writer = loop.summary_writer(pathlib.Path({str(tmp_path)!r}))
writer.add_scalar("train/loss_seg", 2.5, 7)
writer.close()
print("torch" in sys.modules)
import torch  # still importable afterwards
from tensorboardX.proto import event_pb2
(path,) = pathlib.Path({str(tmp_path)!r}).glob("events.out.tfevents.*")
# TFRecord framing: 8-byte length, 4-byte CRC, the Event, 4-byte CRC.
data, values = path.read_bytes(), []
while data:
  (length,) = struct.unpack("<Q", data[:8])
  event = event_pb2.Event.FromString(data[12:12 + length])
  values += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  data = data[12 + length + 4:]
print(values)
'''
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines() == ['False', "[(7, 'train/loss_seg', 2.5)]"]
