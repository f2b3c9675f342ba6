"""Dense O(N^2) masked forms of every variant (SPEC section 1, steps 8-9): the oracle the fast paths are tested against.

All arithmetic runs in float32, or float64 for float64 inputs; the result is cast back to q's dtype. The decay
between two tokens is summed directly (``segment_sums``), never taken as a difference of one long cumulative sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from twomamba_jax.ops.features import feature_map
from twomamba_jax.ops.numerics import (compute_dtype, normalized, row_segment_sums, segment_sums, suffix_sums,
                                       zero_log_decay)
from twomamba_jax.ops.state import (KVCache, RecurrentState, init_state, map_query_blocks, poison_overflow,
                                    write_tokens)


def _log_decay_heads_first(log_decay, q, dtype):
    """(B, N, H) -> (B, H, N) in ``dtype``; zeros when there is no decay."""
    if log_decay is None:
        log_decay = zero_log_decay(q)
    return log_decay.astype(dtype).transpose(0, 2, 1)


def reference_attention(q, k, v, log_decay, *, power, normalize, scale, initial_state=None, return_state=False,
                        max_len=None):
    """Dense decayed attention. Shapes as ``twomamba_jax.ops.decayed_attention``; returns y or (y, state)."""
    if power == "exp":
        return _exp_attention(q, k, v, log_decay, normalize=normalize, scale=scale, cache=initial_state,
                              return_state=return_state, max_len=max_len)
    dtype = compute_dtype(q, k, v)
    qs, k, v = (q * scale).astype(dtype), k.astype(dtype), v.astype(dtype)
    a = _log_decay_heads_first(log_decay, q, dtype)  # (B, H, N)

    scores = jnp.einsum("bihd,bjhd->bhij", qs, k)
    weights = (scores if power == 1 else scores**2) * jnp.exp(segment_sums(a))
    numerator = jnp.einsum("bhij,bjhe->bihe", weights, v)
    normalizer = weights.sum(-1).transpose(0, 2, 1) if normalize else None

    if initial_state is not None:
        # Tokens before this sequence reach token i through exp(g_i) * phi(q_i)^T S_0.
        inflow = jnp.exp(jnp.cumsum(a, -1)).transpose(0, 2, 1)[..., None] * feature_map(qs, power)  # (B, N, H, F)
        numerator = numerator + jnp.einsum("bnhf,bhfe->bnhe", inflow, initial_state.numerator.astype(dtype))
        if normalize:
            normalizer = normalizer + jnp.einsum("bnhf,bhf->bnh", inflow, initial_state.normalizer.astype(dtype))
    y = normalized(numerator, normalizer).astype(q.dtype)
    if not return_state:
        return y

    # S_N = exp(g_N) S_0 + sum_j exp(g_N - g_j) phi(k_j) [v_j, 1]^T, with g_N - g_j summed directly.
    key_weights = jnp.exp(suffix_sums(a)).transpose(0, 2, 1)[..., None] * feature_map(k, power)
    new_num = jnp.einsum("bnhf,bnhe->bhfe", key_weights, v)
    new_den = key_weights.sum(1) if normalize else None
    if initial_state is not None:
        carry = jnp.exp(a.sum(-1))
        new_num = new_num + carry[..., None, None] * initial_state.numerator
        if normalize:
            new_den = new_den + carry[..., None] * initial_state.normalizer
    return y, RecurrentState(numerator=new_num, normalizer=new_den)


def _exp_attention(q, k, v, log_decay, *, normalize, scale, cache: KVCache | None, return_state: bool, max_len):
    """``w_ij = exp(s_ij + g_i - g_j)`` over the cached tokens and the causal part of this sequence."""
    dtype = compute_dtype(q, k, v)
    batch, length, heads, dk = q.shape
    a = _log_decay_heads_first(log_decay, q, dtype)  # (B, H, N)
    qs, keys, values = (q * scale).astype(dtype), k.astype(dtype), v.astype(dtype)

    def weigh(logits):
        return jax.nn.softmax(logits, axis=-1) if normalize else jnp.exp(logits)

    if cache is None and return_state:
        cache = init_state(batch, heads, dk, v.shape[-1], power="exp", normalize=normalize,
                           max_len=max_len or length, dtype=q.dtype)
    if cache is None:
        logits = jnp.einsum("bihd,bjhd->bhij", qs, keys) + segment_sums(a)  # -inf above the diagonal
        return jnp.einsum("bhij,bjhe->bihe", weigh(logits), values).astype(q.dtype)

    # Cached token j reaches new token i through (decay from j to the cache's latest) + (from there to i).
    capacity = cache.keys.shape[1]
    cached_keys = cache.keys.astype(dtype)
    cached_decay = jnp.where(jnp.arange(capacity) < cache.length,
                             cache.log_decay.astype(dtype).transpose(0, 2, 1), -jnp.inf)  # (B, H, L)
    all_values = jnp.concatenate([cache.values.astype(dtype), values], axis=1)

    def attend(block):
        rows, to_rows, index = block  # (B, R, H, dk), (B, R, H): decay from the cache's latest, (1, R)
        cached = jnp.einsum("bihd,bjhd->bhij", rows, cached_keys)
        cached = cached + to_rows.transpose(0, 2, 1)[..., None] + cached_decay[..., None, :]
        fresh = jnp.einsum("bihd,bjhd->bhij", rows, keys) + row_segment_sums(a, index[0])
        return jnp.einsum("bhij,bjhe->bihe", weigh(jnp.concatenate([cached, fresh], axis=-1)), all_values)

    to_query = jnp.cumsum(a, -1).transpose(0, 2, 1)  # (B, N, H)
    y = map_query_blocks(attend, (qs, to_query, jnp.arange(length)[None]), keys=capacity + length,
                         batch_heads=batch * heads).astype(q.dtype)
    y = poison_overflow(y, capacity, cache.length, length)
    if not return_state:
        return y
    # Rebase on the newest token: old entries decay by this sequence's total, new ones by what follows them.
    rebased = cache.log_decay + a.sum(-1)[:, None, :].astype(cache.log_decay.dtype)
    new_cache = KVCache(
        keys=write_tokens(cache.keys, k, cache.length),
        values=write_tokens(cache.values, v, cache.length),
        log_decay=write_tokens(rebased, suffix_sums(a).transpose(0, 2, 1), cache.length),
        length=cache.length + length,
    )
    return y, new_cache
