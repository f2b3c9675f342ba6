"""Experiment configs (installed as ``twomamba_jax.configs``): model size x mixer x data x schedule."""
