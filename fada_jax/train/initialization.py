"""A run's first variables: random ones, with the parts of config.init_checkpoint over them.

Used by the training loop (to start) and by the pre-flight checks (traced abstractly, to
check the checkpoint fits before anything is written); it imports neither.
"""

from typing import Any

import jax

from fada_jax import checkpoint as checkpoint_lib
from fada_jax import models as models_lib
from fada_jax.errors import UserError
from fada_jax.models import variables as variables_lib
from fada_jax.train import distributed
from fada_jax.train import state as state_lib


def initial_variables(config, models, rng: jax.Array) -> dict:
  """Random variables, with the parts `config.init_checkpoint` provides loaded over them.

  As the release: an ImageNet checkpoint fills the feature extractor; a FADA checkpoint
  (e.g. stage 1's final step) fills the feature extractor and the classifier, and in
  stage 2 also the discriminator when it holds one (`model_D` of a released stage-2
  checkpoint), so that training continues from it; otherwise stage 2 draws a fresh one.
  Process 0 prints one line saying which parts were loaded and which are fresh.
  """
  source = config.init_checkpoint
  used = state_lib.trainable_modules(config.stage)
  if not source:
    _note_initialisation(source, (), used)
    return models_lib.init_variables(models, rng, config)
  loaded, meta = checkpoint_lib.load_model(source)
  arch = meta.get('arch')
  if arch and arch != config.model.arch:
    raise UserError(f'config.init_checkpoint={source} holds a {arch} network but '
                    f'config.model.arch={config.model.arch}')
  parts = ['feature_extractor']
  if meta.get('kind') != 'imagenet':
    parts.append('classifier')
    if 'discriminator' in used:
      parts.append('discriminator')
    classes = meta.get('num_classes')
    if classes is not None and 'classifier' in loaded and int(classes) != config.model.num_classes:
      raise UserError(f'config.init_checkpoint={source} predicts {classes} classes but '
                      f'config.model.num_classes={config.model.num_classes}')
  parts = [p for p in parts if p in loaded]
  if 'feature_extractor' not in parts:
    raise UserError(f'config.init_checkpoint={source} holds no feature extractor '
                    f'(parts: {", ".join(sorted(loaded))})')
  # Check against the shapes first (no compilation), so a wrong file fails at once.
  abstract = jax.eval_shape(lambda r: models_lib.init_variables(models, r, config), rng)
  fitted = {}
  for part in parts:
    given = {k: loaded[part].get(k, {}) for k in abstract[part]}
    fitted[part] = variables_lib.fit(part, given, abstract[part],
                                     f'config.init_checkpoint={source}', config.model)
  # Only the parts the checkpoint leaves fresh are initialised (a ResNet's initialiser
  # alone compiles for seconds).
  variables = models_lib.init_variables(
      models, rng, config, parts=[p for p in models_lib.PARTS if p not in fitted])
  variables.update(fitted)
  variables = {part: variables[part] for part in models_lib.PARTS}
  _note_initialisation(source, parts, used)
  return variables


def _note_initialisation(source: str, loaded: Any, used: tuple) -> None:
  if not distributed.is_main_process():
    return
  fresh = [part for part in used if part not in loaded]
  words = []
  if loaded:
    words.append(f'loaded {", ".join(loaded)} from {source}')
  if fresh:
    words.append(f'fresh {", ".join(fresh)}')
  print('initial variables: ' + '; '.join(words), flush=True)
