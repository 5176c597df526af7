"""FADA: fine-grained adversarial domain adaptation for semantic segmentation, in JAX."""

__version__ = "0.1.0"
