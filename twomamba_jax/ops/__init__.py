"""Pure functions: the math of every mixer. Layout ``(B, N, H, d)`` for per-head tensors, ``(B, N, H)`` for scalars."""

from twomamba_jax.ops.api import DEFAULT_CHUNK_SIZE, IMPLS, decayed_attention, decayed_attention_step
from twomamba_jax.ops import remat
from twomamba_jax.ops.features import feature_map, feature_size
from twomamba_jax.ops.state import AttentionState, KVCache, RecurrentState, init_state

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "IMPLS",
    "AttentionState",
    "KVCache",
    "RecurrentState",
    "decayed_attention",
    "decayed_attention_step",
    "feature_map",
    "feature_size",
    "init_state",
    "remat",
]
