"""twomamba_jax: the 2Mamba family of sequence models in JAX / Flax NNX."""

__version__ = "0.1.0"
