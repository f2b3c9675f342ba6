"""Linen adapters (via ``flax.nnx.bridge.to_linen``) so Linen codebases can use the mixers as Linen modules.

Each function takes the NNX module's constructor arguments, less ``rngs`` (Linen's ``init`` supplies them),
plus an optional Linen ``name``, and returns a ``linen.Module``::

    layer = decayed_attention_linen(512, 8, 64, presets.mixer_config("2mamba"))
    variables = layer.init(jax.random.key(0), x)      # x: (B, N, 512)
    y = layer.apply(variables, x)

The parameters live under ``variables["params"]`` in the NNX module's own tree.
"""

from flax import linen
from flax.nnx import bridge

from twomamba_jax.nn.attention import SoftmaxAttention
from twomamba_jax.nn.mamba2 import Mamba2
from twomamba_jax.nn.mixer import DecayedAttention


def decayed_attention_linen(*args, name: str | None = None, **kwargs) -> linen.Module:
    """``DecayedAttention(*args, **kwargs)`` as a Linen module."""
    return bridge.to_linen(DecayedAttention, *args, name=name, **kwargs)


def mamba2_linen(*args, name: str | None = None, **kwargs) -> linen.Module:
    """``Mamba2(*args, **kwargs)`` as a Linen module."""
    return bridge.to_linen(Mamba2, *args, name=name, **kwargs)


def softmax_attention_linen(*args, name: str | None = None, **kwargs) -> linen.Module:
    """``SoftmaxAttention(*args, **kwargs)`` as a Linen module."""
    return bridge.to_linen(SoftmaxAttention, *args, name=name, **kwargs)
