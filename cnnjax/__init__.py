"""cnnjax: the convolutional networks of the lecture in JAX/Flax, built as research software."""

__version__ = "0.1.0"
