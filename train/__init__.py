"""Training (installed as ``twomamba_jax.train``): trainer, data pipeline, checkpoints, metrics and CLI."""
