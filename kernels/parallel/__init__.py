"""Flash-style (quadratic, tiled, O(N) memory) kernels for powers 1, 2 and exp in Pallas: Triton on GPU, Mosaic GPU
(wgmma, TMA) on Hopper GPUs, Mosaic on TPU, interpret mode on CPU."""

from twomamba_jax.kernels.parallel.pallas import (mosaic_gpu_unsupported_reason, parallel_attention_pallas,
                                                  unsupported_reason)

__all__ = ["mosaic_gpu_unsupported_reason", "parallel_attention_pallas", "unsupported_reason"]
