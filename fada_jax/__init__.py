"""FADA: fine-grained adversarial domain adaptation for semantic segmentation, in JAX.

`fada_jax.load(checkpoint, config=None)` gives a trained model whose `predict(images)`
segments images (fada_jax/api.py).
"""

__version__ = "0.1.0"


def __getattr__(name):
  # Imported on first use, so that `python -m fada_jax.main --help` loads no JAX.
  if name in ("load", "Model"):
    from fada_jax import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f"module 'fada_jax' has no attribute {name!r}")
