"""Pallas kernels (installed as ``twomamba_jax.kernels``): one folder per kernel family.

Plain arrays in and out, no Flax. The ops in ``twomamba_jax.ops`` dispatch to them where they apply.
"""
