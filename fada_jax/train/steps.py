"""One training step of each FADA stage as a pure function `(state, batch) -> (state, metrics)`.

Build a step with `make_step(config, models, state)` (or bind the keyword arguments of
the `*_step` functions yourself); jit it with `fada_jax.train.parallel.jit_step`.
`metrics` holds the release's loss names plus `lr` (and `lr_D` in stage 2), the learning
rates this update used.

Batches (images uint8 RGB NHWC, normalised as the steps' first op on the device, see
`_network_input`; labels integer train ids, 255 ignored):
  source_only, self_distill: {'image': [B, H, W, 3], 'label': [B, H, W]}
  adversarial:               {'source_image': [B/2, Hs, Ws, 3], 'source_label': [B/2, Hs, Ws],
                              'target_image': [B/2, Ht, Wt, 3]}

Trainable BN and devices: the networks are built with `axis_name=None` and the step is
jit-compiled over a batch sharded along the mesh's 'data' axis (see parallel.py). The
batch-norm means are then means over the *global* batch, and XLA's partitioner inserts
the cross-device reductions itself: the equivalent of the release's SyncBatchNorm, with
the same statistics on 1 or N devices. The losses are global means for the same reason.
"""

import functools
from typing import Callable, Dict, Mapping, Optional, Tuple

import jax

from fada_jax import losses
from fada_jax.data import transforms
from fada_jax.models import conv_dispatch
from fada_jax.models.layers import resize_bilinear_align_corners
from fada_jax.train import state as state_lib

Batch = Mapping[str, jax.Array]
Metrics = Dict[str, jax.Array]
StepFn = Callable[[state_lib.TrainState, Batch], Tuple[state_lib.TrainState, Metrics]]


def _bn_trainable(config, batch_stats) -> bool:
  return (not config.model.freeze_bn) and bool(jax.tree_util.tree_leaves(batch_stats))


def _network_input(config, images):
  """uint8 pixels -> config.data.normalization's input, float32 then the compute dtype."""
  return transforms.normalize_on_device(images, transforms.normalization_mode(config),
                                        config.model.get('dtype', 'float32'))


def _extract_features(models, config, params, batch_stats, images):
  """Feature extractor in training mode; returns (features, new batch_stats)."""
  variables = {'params': params, 'batch_stats': batch_stats}
  if _bn_trainable(config, batch_stats):
    features, updated = models.feature_extractor.apply(
        variables, images, train=True, mutable=['batch_stats'])
    return features, updated['batch_stats']
  return models.feature_extractor.apply(variables, images, train=True), batch_stats


def _upsampled(module, params, features, size_hw):
  """Head output resized to the input size (bilinear, align_corners=True), as the release."""
  return resize_bilinear_align_corners(module.apply({'params': params}, features), size_hw)


def _learning_rates(config, step) -> Metrics:
  lrs = state_lib.schedules(config)
  metrics = {'lr': lrs['feature_extractor'](step)}
  if config.stage == 'adversarial':
    metrics['lr_D'] = lrs['discriminator'](step)
  return metrics


def segmentation_step(state: state_lib.TrainState, batch: Batch, *, models, config,
                      optimizers) -> Tuple[state_lib.TrainState, Metrics]:
  """Stages 1 and 3: cross-entropy (ignore 255) of the logits upsampled to the label size."""
  images, labels = _network_input(config, batch['image']), batch['label']
  fe_stats = state.batch_stats['feature_extractor']

  def loss_fn(params):
    features, new_stats = _extract_features(models, config, params['feature_extractor'],
                                            fe_stats, images)
    logits = _upsampled(models.classifier, params['classifier'], features, labels.shape[1:3])
    return losses.cross_entropy(logits, labels), new_stats

  (loss_seg, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  params, opt_state = state_lib.apply_updates(optimizers, state.params, grads,
                                              state.opt_state, state.params.keys())
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            batch_stats={**state.batch_stats, 'feature_extractor': new_stats})
  return new_state, {'loss_seg': loss_seg, **_learning_rates(config, state.step)}


source_only_step = segmentation_step
self_distill_step = segmentation_step


def adversarial_step(state: state_lib.TrainState, batch: Batch, *, models, config,
                     optimizers) -> Tuple[state_lib.TrainState, Metrics]:
  """Stage 2, the release's `train_adv` iteration.

  Generator (feature extractor + classifier) loss:
    loss_seg = CE(up(C(F(x_s))) / T, y_s)
    loss_adv_tgt = adv_weight * softCE(up(D(F(x_t))), [a_t, 0])
  with a = min(softmax(up(C(F(x))) / T), 0.9), stop-gradient. D's gradients from this
  loss are discarded. Discriminator loss, on the same (pre-update, stop-gradient) features:
    loss_D = 0.5 softCE(up(D(f_s)), [a_s, 0]) + 0.5 softCE(up(D(f_t)), [0, a_t]).
  Both losses are differentiated in one backward pass: each network only sees its own
  loss because the other one reaches it through stop_gradient. The release updates the
  generator before D, but D's loss depends on neither updated value, so the order of the
  two updates does not change the result.
  """
  solver = config.solver
  temperature = float(solver.temperature)
  soft_max = float(solver.soft_label_max)
  adv_weight = float(solver.adv_weight)
  source_images = _network_input(config, batch['source_image'])
  source_labels = batch['source_label']
  target_images = _network_input(config, batch['target_image'])
  source_hw, target_hw = source_images.shape[1:3], target_images.shape[1:3]
  fe_stats = state.batch_stats['feature_extractor']

  def loss_fn(params):
    fe_params, cls_params = params['feature_extractor'], params['classifier']
    disc_params = params['discriminator']
    # Source then target, as two batches: trainable BN normalises each domain by its
    # own statistics and updates the running statistics twice, as the release does.
    source_features, stats = _extract_features(models, config, fe_params, fe_stats,
                                               source_images)
    source_logits = _upsampled(models.classifier, cls_params, source_features,
                               source_hw) / temperature
    loss_seg = losses.cross_entropy(source_logits, source_labels)
    target_features, stats = _extract_features(models, config, fe_params, stats,
                                               target_images)
    target_logits = _upsampled(models.classifier, cls_params, target_features,
                               target_hw) / temperature
    source_soft = losses.soft_labels(source_logits, soft_max)
    target_soft = losses.soft_labels(target_logits, soft_max)

    frozen_disc = jax.lax.stop_gradient(disc_params)
    target_domain = _upsampled(models.discriminator, frozen_disc, target_features, target_hw)
    loss_adv_tgt = adv_weight * losses.soft_cross_entropy(
        target_domain, losses.source_domain_encoding(target_soft))

    source_domain_d = _upsampled(models.discriminator, disc_params,
                                 jax.lax.stop_gradient(source_features), source_hw)
    target_domain_d = _upsampled(models.discriminator, disc_params,
                                 jax.lax.stop_gradient(target_features), target_hw)
    loss_d_src = 0.5 * losses.soft_cross_entropy(
        source_domain_d, losses.source_domain_encoding(source_soft))
    loss_d_tgt = 0.5 * losses.soft_cross_entropy(
        target_domain_d, losses.target_domain_encoding(target_soft))

    total = loss_seg + loss_adv_tgt + loss_d_src + loss_d_tgt
    aux = dict(loss_seg=loss_seg, loss_adv_tgt=loss_adv_tgt, loss_D=loss_d_src + loss_d_tgt,
               loss_D_src=loss_d_src, loss_D_tgt=loss_d_tgt)
    return total, (aux, stats)

  (_, (metrics, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  params, opt_state = state_lib.apply_updates(optimizers, state.params, grads,
                                              state.opt_state, state.params.keys())
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            batch_stats={**state.batch_stats, 'feature_extractor': new_stats})
  return new_state, {**metrics, **_learning_rates(config, state.step)}


_STEPS = {
    'source_only': source_only_step,
    'adversarial': adversarial_step,
    'self_distill': self_distill_step,
}


def make_step(config, models, state: state_lib.TrainState,
              matmul_convs: Optional[bool] = None) -> StepFn:
  """The pure step of `config.stage` with the networks and optimisers bound.

  `state` (or its abstract shape) provides the parameter and batch-stat structure the
  optimisers need (the frozen-BN mask); it is not captured. `matmul_convs` runs
  convolutions' weight gradients (and 1x1 / narrow convs outright) as matrix products,
  see models/conv_dispatch.py; None follows config.model.matmul_convs ('auto': on for
  the CPU backend, where it is faster).
  """
  state_lib.trainable_modules(config.stage)  # validates config.stage
  optimizers = state_lib.make_optimizers(config, state.params, state.batch_stats)
  step = functools.partial(_STEPS[config.stage], models=models, config=config,
                           optimizers=optimizers)
  matmul_convs = conv_dispatch.enabled_for(config, matmul_convs)

  def step_fn(state, batch):
    with conv_dispatch.use_matmul_convs(matmul_convs):
      return step(state, batch)

  return step_fn


def compiler_options(config, matmul_convs: Optional[bool] = None) -> dict:
  """XLA options for the step of `make_step(config, ..., matmul_convs)`, for
  `parallel.jit_step` (models/conv_dispatch.py: CPU fusion options; none on GPUs)."""
  return conv_dispatch.compiler_options(conv_dispatch.enabled_for(config, matmul_convs))


def batch_keys(stage: str) -> Tuple[str, ...]:
  """The arrays a batch of `stage` must hold."""
  if stage == 'adversarial':
    return ('source_image', 'source_label', 'target_image')
  return ('image', 'label')

