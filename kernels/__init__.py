"""Pallas kernels (installed as ``twomamba_jax.kernels``): one folder per kernel family.

Plain arrays in and out, no Flax: ``chunked`` (state passing) and ``parallel`` (flash-style).
``twomamba_jax.ops.decayed_attention(..., impl="pallas" | "pallas_chunked" | "pallas_parallel")`` reaches them.
"""
