"""Linen adapters (via ``flax.nnx.bridge``) so Linen codebases can use the mixers as ordinary Linen modules.

Each class takes the NNX module's constructor arguments, less ``rngs`` (Linen's ``init`` supplies them)::

    layer = DecayedAttentionLinen(512, 8, 64, presets.mixer_config("2mamba"))
    variables = layer.init(jax.random.key(0), x)
    y = layer.apply(variables, x)
"""

from flax.nnx import bridge

from twomamba_jax.nn.attention import SoftmaxAttention
from twomamba_jax.nn.mamba2 import Mamba2
from twomamba_jax.nn.mixer import DecayedAttention

DecayedAttentionLinen = bridge.to_linen_class(DecayedAttention)
Mamba2Linen = bridge.to_linen_class(Mamba2)
SoftmaxAttentionLinen = bridge.to_linen_class(SoftmaxAttention)

__all__ = ["DecayedAttentionLinen", "Mamba2Linen", "SoftmaxAttentionLinen"]
