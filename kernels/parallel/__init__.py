"""Flash-style (quadratic, tiled, O(N) memory) kernels for powers 1, 2 and exp in Pallas: Triton on GPU,
Mosaic on TPU, interpret mode on CPU."""

from twomamba_jax.kernels.parallel.pallas import parallel_attention_pallas, unsupported_reason

__all__ = ["parallel_attention_pallas", "unsupported_reason"]
