"""Causal softmax attention with RoPE and GQA, via ``jax.nn.dot_product_attention`` (cuDNN on GPUs)."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from twomamba_jax import ops
from twomamba_jax.nn import initializers as inits
from twomamba_jax.nn.layers import check_model_input
from twomamba_jax.nn.partitioning import per_head
from twomamba_jax.ops.numerics import document_starts
from twomamba_jax.ops.state import check_cache_room, map_query_blocks, poison_overflow, write_tokens


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """num_kv_heads: key/value heads for GQA (None = one per query head); rope_theta: RoPE base.

    implementation: passed to ``jax.nn.dot_product_attention`` for whole sequences; None picks cuDNN for 16-bit
    inputs on GPU and XLA elsewhere. Decoding (``step``) always uses XLA: it attends through an explicit mask
    over the cache slots, a long prompt in blocks of query rows (``ops.state.map_query_blocks``).
    """

    num_kv_heads: int | None = None
    rope_theta: float = 10000.0
    implementation: str | None = None

    def __post_init__(self):
        if self.num_kv_heads is not None:
            ops.validation.check_positive_int("num_kv_heads", self.num_kv_heads)
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta: expected a positive number; got {self.rope_theta!r}")
        if self.implementation not in (None, "xla", "cudnn"):
            raise ValueError(f"implementation: expected None, 'xla' or 'cudnn'; got {self.implementation!r}")


class AttentionCache(NamedTuple):
    """keys, values: (B, L, H_kv, d) with L the capacity; length: () int32 tokens stored; start: (B,) int32 the
    slot where each row's current document starts (0 unless a packed prompt came with segment ids): the next token
    attends to the slots from there on."""

    keys: jax.Array
    values: jax.Array
    length: jax.Array
    start: jax.Array


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (rotate-half form). x: (B, T, H, d) with d even; positions: (T,) integer."""
    half = x.shape[-1] // 2
    dtype = jnp.promote_types(x.dtype, jnp.float32)  # angles of late positions need float32 at least
    inv_freq = theta ** (-jnp.arange(half, dtype=dtype) / half)
    angles = positions.astype(dtype)[:, None] * inv_freq  # (T, d/2)
    sin, cos = jnp.sin(angles)[:, None, :], jnp.cos(angles)[:, None, :]
    x1, x2 = jnp.split(x.astype(dtype), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _causal_attention(q, k, v, segment_ids=None, *, implementation):
    """Causal ``jax.nn.dot_product_attention`` on (B, N, H, d), masked to each token's own document where
    ``segment_ids`` (B, N) is given (a boolean (B, 1, N, N) mask, which cuDNN and XLA both take)."""
    mask = None if segment_ids is None else (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)


class SoftmaxAttention(nnx.Module):
    """Standard causal multi-head attention: (B, N, M) -> (B, N, M)."""

    def __init__(self, model_dim: int, num_heads: int, head_dim: int, config: AttentionConfig = AttentionConfig(),
                 *, init: str = "torch", dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        inits.check_init(init)
        for name, value in (("model_dim", model_dim), ("num_heads", num_heads), ("head_dim", head_dim)):
            ops.validation.check_positive_int(name, value)
        if head_dim % 2:
            raise ValueError(f"head_dim: RoPE rotates pairs of dims and needs an even head_dim; got {head_dim}")
        kv_heads = config.num_kv_heads or num_heads
        if num_heads % kv_heads:
            raise ValueError(f"num_kv_heads: expected a divisor of num_heads={num_heads}; got {kv_heads}")
        self.config = config
        self.model_dim, self.num_heads, self.num_kv_heads, self.head_dim = model_dim, num_heads, kv_heads, head_dim
        self.dtype = dtype
        weight = inits.linear_weight(init, model_dim)
        self.q_proj = inits.make_param(rngs, weight, (model_dim, num_heads, head_dim),
                                       ("embed", "heads", "head_dim"), param_dtype)
        self.k_proj = inits.make_param(rngs, weight, (model_dim, kv_heads, head_dim),
                                       ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v_proj = inits.make_param(rngs, weight, (model_dim, kv_heads, head_dim),
                                       ("embed", "kv_heads", "head_dim"), param_dtype)
        self.out = inits.make_param(rngs, inits.linear_weight(init, num_heads * head_dim),
                                    (num_heads, head_dim, model_dim), ("heads", "head_dim", "embed"), param_dtype)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """x: (B, N, M) -> (B, N, M). segment_ids: (B, N) integers, the document of each token of packed rows (a
        token attends only to earlier tokens of its own document), or None. RoPE needs no restart per document:
        its scores depend on relative positions only."""
        check_model_input(x, self.model_dim)
        if segment_ids is not None:
            ops.validation.check_segment_ids(segment_ids, *x.shape[:2])
        q, k, v = self._project(x, jnp.arange(x.shape[1]))
        core = functools.partial(_causal_attention, implementation=self._implementation(q))
        y = per_head(core, q, k, v, segment_ids=segment_ids)
        return self._merge(y)

    def init_cache(self, batch_size: int, max_len: int) -> AttentionCache:
        """Empty KV cache with room for ``max_len`` tokens."""
        ops.validation.check_positive_int("max_len", max_len)
        shape = (batch_size, max_len, self.num_kv_heads, self.head_dim)
        return AttentionCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype), jnp.zeros((), jnp.int32),
                              jnp.zeros((batch_size,), jnp.int32))

    def step(self, x: jax.Array, cache: AttentionCache, segment_ids: jax.Array | None = None
             ) -> tuple[jax.Array, AttentionCache]:
        """Append x: (B, T, M) to the cache and attend over its current document. Returns (y (B, T, M), cache).
        segment_ids: (B, T) integers, the documents of a packed prompt, or None: the cache's current document
        continues into the first one, no token sees an earlier document, and the next token continues the last."""
        check_model_input(x, self.model_dim)
        length, capacity = x.shape[1], cache.keys.shape[1]
        check_cache_room("cache", capacity, cache.length, length)
        positions = cache.length + jnp.arange(length)
        q, k, v = self._project(x, positions)
        keys = write_tokens(cache.keys, k, cache.length)
        values = write_tokens(cache.values, v, cache.length)
        starts = jnp.broadcast_to(cache.start[:, None], (x.shape[0], length))  # (B, T): each token's document start
        if segment_ids is not None:
            ops.validation.check_segment_ids(segment_ids, *x.shape[:2])
            begins = jnp.where(document_starts(segment_ids), positions, 0)
            starts = jnp.maximum(starts, jax.lax.cummax(begins, axis=1))

        def attend(block):
            rows, row_positions, row_starts = block
            slots = jnp.arange(capacity)
            # causal over the filled slots of each row's document: (B, rows, L)
            visible = (slots <= row_positions[0][:, None]) & (slots >= row_starts[..., None])
            return jax.nn.dot_product_attention(rows, keys.astype(q.dtype), values.astype(q.dtype),
                                                mask=visible[:, None], implementation="xla")

        y = map_query_blocks(attend, (q, positions[None], starts), keys=capacity,
                             batch_heads=q.shape[0] * q.shape[2])
        y = poison_overflow(y, capacity, cache.length, length)
        return self._merge(y), AttentionCache(keys, values, cache.length + length, starts[:, -1])

    def _project(self, x, positions):
        dtype = self.dtype
        x = x.astype(dtype)
        q = jnp.einsum("bnm,mhd->bnhd", x, self.q_proj[...].astype(dtype))
        k = jnp.einsum("bnm,mhd->bnhd", x, self.k_proj[...].astype(dtype))
        v = jnp.einsum("bnm,mhd->bnhd", x, self.v_proj[...].astype(dtype))
        theta = self.config.rope_theta
        return apply_rope(q, positions, theta), apply_rope(k, positions, theta), v

    def _merge(self, y):
        return jnp.einsum("bnhd,hdm->bnm", y.astype(self.dtype), self.out[...].astype(self.dtype))

    def _implementation(self, q):
        if self.config.implementation is not None:
            return self.config.implementation
        on_gpu = jax.default_backend() == "gpu"
        return "cudnn" if on_gpu and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
