"""Flax NNX modules: the decayed-attention mixer, Mamba-2, softmax attention, RMSNorm, SwiGLU, the language model.

Every sequence mixer maps (B, N, M) -> (B, N, M) and, like the LM (tokens -> logits), has a decode path:
``cache = module.init_cache(batch, max_len)`` then ``y, cache = module.step(x, cache)`` over a prompt or
one token at a time. Powers 1 and 2 and Mamba-2 keep a fixed-size state; softmax and 2Mamba-E a KV cache.
Parameters carry logical axis names (``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``vocab``,
``conv``); ``nnx.get_partition_spec(nnx.state(model))`` reads them.
"""

from twomamba_jax.nn.attention import AttentionCache, AttentionConfig, SoftmaxAttention, apply_rope
from twomamba_jax.nn.initializers import INITS
from twomamba_jax.nn.layers import CausalConv, RMSNorm, SwiGLU
from twomamba_jax.nn.mamba2 import Mamba2, Mamba2Cache, Mamba2Config, ssd
from twomamba_jax.nn.mixer import DecayedAttention, MixerCache, MixerConfig
from twomamba_jax.nn.model import Block, LanguageModel, ModelConfig, make_mixer

__all__ = [
    "INITS",
    "AttentionCache",
    "AttentionConfig",
    "Block",
    "CausalConv",
    "DecayedAttention",
    "LanguageModel",
    "Mamba2",
    "Mamba2Cache",
    "Mamba2Config",
    "MixerCache",
    "MixerConfig",
    "ModelConfig",
    "RMSNorm",
    "SoftmaxAttention",
    "SwiGLU",
    "apply_rope",
    "make_mixer",
    "ssd",
]
