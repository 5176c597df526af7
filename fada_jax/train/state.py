"""Training state and optimisers of the three FADA stages.

The release trains three networks with three optimisers, all on the same poly schedule:
  feature extractor  SGD(lr, momentum 0.9, weight decay 5e-4)        torch semantics
  classifier         SGD(lr x classifier_lr_mult, same momentum/wd)  torch semantics
  discriminator      Adam(lr_D, betas (0.9, 0.99), eps 1e-8), no wd  (stage 2 only)
torch's SGD computes `v = mu v + g + wd p; p -= lr v`, which is optax's
`chain(add_decayed_weights(wd), sgd(lr, momentum))`; torch's and optax's Adam are the
same update (bias-corrected moments, eps outside the square root).

Frozen BN (config.model.freeze_bn): the release keeps BN weight/bias as buffers, so no
update and no weight decay reach them. Here they are params (one variable layout for
every config) that the network wraps in stop_gradient, and the optimiser masks them
with `set_to_zero`, so weight decay cannot move them either.
"""

from typing import Any, Dict, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from fada_jax.constants import STAGES
from fada_jax.errors import UserError

TRAINABLE = 'trainable'
FROZEN = 'frozen'

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree (checkpointable leaf by leaf).

  step: int32 scalar, updates applied so far (the poly schedule's `it` of the next update).
  params: {'feature_extractor', 'classifier'} plus 'discriminator' in stage 2.
  batch_stats: {'feature_extractor': running mean/var} ({} inside for VGG).
  opt_state: one optax state per key of `params`.
  rng: a PRNG key for the loop's use (no FADA step draws random numbers).
  """
  step: jax.Array
  params: Dict[str, PyTree]
  batch_stats: Dict[str, PyTree]
  opt_state: Dict[str, PyTree]
  rng: jax.Array


def trainable_modules(stage: str) -> tuple:
  if stage not in STAGES:
    raise UserError(f'config.stage={stage!r} is not one of {", ".join(STAGES)}')
  if stage == 'adversarial':
    return ('feature_extractor', 'classifier', 'discriminator')
  return ('feature_extractor', 'classifier')


def poly_schedule(base_lr: float, max_iter: int, power: float) -> optax.Schedule:
  """lr(it) = base * (1 - it / max_iter)^power; `it` = updates done before this one.

  optax's schedules receive the optimiser's update count, which is exactly that `it`.
  0 from max_iter on (the release stops at stop_iter <= max_iter anyway).
  """
  base_lr, max_iter, power = float(base_lr), int(max_iter), float(power)
  if max_iter <= 0:
    raise UserError(f'config.solver.max_iter={max_iter} must be positive')
  poly = optax.polynomial_schedule(init_value=base_lr, end_value=0.0, power=power,
                                   transition_steps=max_iter)
  # Compiled, XLA may compute it / max_iter as it * (1 / max_iter), a hair above 1 at
  # it = max_iter, and the power of the negative remainder is NaN: pin the end to 0.
  return lambda count: jnp.where(count < max_iter, poly(count), 0.0)


def schedules(config) -> Dict[str, optax.Schedule]:
  """The learning rate of each network as a function of the step."""
  solver = config.solver
  lr = poly_schedule(solver.base_lr, solver.max_iter, solver.lr_power)
  mult = float(solver.classifier_lr_mult)
  return {
      'feature_extractor': lr,
      'classifier': lambda count: mult * lr(count),
      'discriminator': poly_schedule(solver.base_lr_d, solver.max_iter, solver.lr_power),
  }


def torch_sgd(learning_rate: optax.ScalarOrSchedule, momentum: float,
              weight_decay: float) -> optax.GradientTransformation:
  """torch.optim.SGD(lr, momentum, weight_decay) (dampening 0, no Nesterov)."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum))


def frozen_bn_labels(params: PyTree, batch_stats: PyTree) -> PyTree:
  """'frozen' for the scale/bias of every BN (a module that owns batch_stats), else 'trainable'."""
  bn_modules = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(batch_stats)[0]:
    bn_modules.add(tuple(_key(k) for k in path[:-1]))

  def label(path, _):
    return FROZEN if tuple(_key(k) for k in path[:-1]) in bn_modules else TRAINABLE

  return jax.tree_util.tree_map_with_path(label, params)


def _key(entry) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def make_optimizers(config, params: Mapping[str, PyTree],
                    batch_stats: Mapping[str, PyTree]) -> Dict[str, optax.GradientTransformation]:
  """One optax transformation per trainable network (keys of `params`)."""
  solver = config.solver
  lrs = schedules(config)
  optimizers = {}
  for name in params:
    if name == 'discriminator':
      optimizers[name] = optax.adam(lrs[name], b1=float(solver.adam_b1),
                                    b2=float(solver.adam_b2), eps=1e-8)
      continue
    sgd = torch_sgd(lrs[name], float(solver.momentum), float(solver.weight_decay))
    stats = batch_stats.get(name, {})
    if name == 'feature_extractor' and config.model.freeze_bn and jax.tree_util.tree_leaves(stats):
      labels = frozen_bn_labels(params[name], stats)
      sgd = optax.multi_transform({TRAINABLE: sgd, FROZEN: optax.set_to_zero()}, labels)
    optimizers[name] = sgd
  return optimizers


def create_train_state(config, models, variables: Mapping[str, Mapping[str, PyTree]],
                       rng: jax.Array) -> TrainState:
  """Step-0 state of `config.stage` from `variables` (the layout of models.init_variables).

  `models` is accepted for symmetry with the step factories; the state itself only
  depends on the variables and the config.
  """
  del models
  modules = trainable_modules(config.stage)
  missing = [m for m in modules if m not in variables or 'params' not in variables[m]]
  if missing:
    raise UserError(f'stage {config.stage!r} needs variables of {", ".join(missing)}')
  params = {m: variables[m]['params'] for m in modules}
  batch_stats = {'feature_extractor': variables['feature_extractor'].get('batch_stats', {})}
  optimizers = make_optimizers(config, params, batch_stats)
  opt_state = {m: optimizers[m].init(params[m]) for m in modules}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=opt_state, rng=rng)


def apply_updates(optimizers: Mapping[str, optax.GradientTransformation], params, grads,
                  opt_state, names) -> tuple:
  """One optimiser step for each network in `names`; others pass through unchanged."""
  new_params, new_opt_state = dict(params), dict(opt_state)
  for name in names:
    updates, new_opt_state[name] = optimizers[name].update(grads[name], opt_state[name],
                                                           params[name])
    new_params[name] = optax.apply_updates(params[name], updates)
  return new_params, new_opt_state

