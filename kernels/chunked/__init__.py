"""Chunked (state-passing) kernels for powers 1 and 2 in Pallas: Triton on GPU, Mosaic on TPU, Mosaic GPU for Hopper
(power 2), interpret mode on CPU."""

from twomamba_jax.kernels.chunked.pallas import chunked_attention_pallas, hopper_unsupported_reason, unsupported_reason

__all__ = ["chunked_attention_pallas", "hopper_unsupported_reason", "unsupported_reason"]
