"""jaxlm: a JAX/Flax training stack for transformer language models."""

__version__ = "0.1.0"
