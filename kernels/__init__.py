"""Pallas kernels (installed as ``twomamba_jax.kernels``): one folder per kernel family.

Plain arrays in and out, no Flax. ``twomamba_jax.ops.decayed_attention(..., impl="pallas")`` reaches them.
"""
