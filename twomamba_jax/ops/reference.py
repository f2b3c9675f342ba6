"""Dense O(N^2) masked forms of every variant (SPEC section 1, steps 8-9): the oracle the fast paths are tested against.

All arithmetic runs in float32, or float64 for float64 inputs; the result is cast back to q's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from twomamba_jax.ops.features import feature_map
from twomamba_jax.ops.numerics import compute_dtype, masked_decay, normalized
from twomamba_jax.ops.state import KVCache, RecurrentState


def _cumsum_heads_first(log_decay, batch, length, heads, dtype):
    """Cumulative log-decay (B, N, H) -> (B, H, N) in ``dtype``; zeros when there is no decay."""
    if log_decay is None:
        return jnp.zeros((batch, heads, length), dtype)
    return jnp.cumsum(log_decay.astype(dtype), axis=1).transpose(0, 2, 1)


def reference_attention(q, k, v, log_decay, *, power, normalize, scale, initial_state=None, return_state=False):
    """Dense decayed attention. Shapes as ``twomamba_jax.ops.decayed_attention``; returns y or (y, state)."""
    if power == "exp":
        return _exp_attention(q, k, v, log_decay, normalize=normalize, scale=scale,
                              cache=initial_state, return_state=return_state)
    dtype = compute_dtype(q, k, v)
    batch, length, heads, _ = q.shape
    qs, k, v = (q * scale).astype(dtype), k.astype(dtype), v.astype(dtype)
    g = _cumsum_heads_first(log_decay, batch, length, heads, dtype)
    causal = jnp.tril(jnp.ones((length, length), bool))

    scores = jnp.einsum("bihd,bjhd->bhij", qs, k)
    weights = (scores if power == 1 else scores**2) * masked_decay(g, g, causal)
    numerator = jnp.einsum("bhij,bjhe->bihe", weights, v)
    normalizer = weights.sum(-1).transpose(0, 2, 1) if normalize else None

    if initial_state is not None:
        # Tokens before this sequence reach token i through exp(g_i) * phi(q_i)^T S_0.
        inflow = jnp.exp(g).transpose(0, 2, 1)[..., None] * feature_map(qs, power)  # (B, N, H, F)
        numerator = numerator + jnp.einsum("bnhf,bhfe->bnhe", inflow, initial_state.numerator.astype(dtype))
        if normalize:
            normalizer = normalizer + jnp.einsum("bnhf,bhf->bnh", inflow, initial_state.normalizer.astype(dtype))
    y = normalized(numerator, normalizer).astype(q.dtype)
    if not return_state:
        return y

    # S_N = exp(g_last) S_0 + sum_j exp(g_last - g_j) phi(k_j) [v_j, 1]^T
    g_last = g[..., -1]
    key_weights = jnp.exp(g_last[..., None] - g).transpose(0, 2, 1)[..., None] * feature_map(k, power)
    new_num = jnp.einsum("bnhf,bnhe->bhfe", key_weights, v)
    new_den = key_weights.sum(1) if normalize else None
    if initial_state is not None:
        carry = jnp.exp(g_last)
        new_num = new_num + carry[..., None, None] * initial_state.numerator
        if normalize:
            new_den = new_den + carry[..., None] * initial_state.normalizer
    return y, RecurrentState(numerator=new_num, normalizer=new_den)


def _exp_attention(q, k, v, log_decay, *, normalize, scale, cache: KVCache | None, return_state: bool):
    """``w_ij = exp(s_ij + g_i - g_j)`` over the cached tokens and the causal part of this sequence."""
    dtype = compute_dtype(q, k, v)
    batch, length, heads, _ = q.shape
    local_g = _cumsum_heads_first(log_decay, batch, length, heads, dtype)  # (B, H, N)
    causal = jnp.tril(jnp.ones((length, length), bool))
    if cache is None:
        keys, values, g_keys, g_queries, mask = k, v, local_g, local_g, causal
    else:
        capacity = cache.keys.shape[1]
        g_queries = cache.log_decay_total.astype(dtype)[..., None] + local_g
        keys = jnp.concatenate([cache.keys.astype(k.dtype), k], axis=1)
        values = jnp.concatenate([cache.values.astype(v.dtype), v], axis=1)
        g_keys = jnp.concatenate([cache.log_decay_cumsum.astype(dtype).transpose(0, 2, 1), g_queries], axis=-1)
        filled = jnp.broadcast_to(jnp.arange(capacity) < cache.length, (length, capacity))
        mask = jnp.concatenate([filled, causal], axis=1)

    logits = jnp.einsum("bihd,bjhd->bhij", (q * scale).astype(dtype), keys.astype(dtype))
    logits = jnp.where(mask, logits + g_queries[..., :, None] - g_keys[..., None, :], -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1) if normalize else jnp.exp(logits)
    y = jnp.einsum("bhij,bjhe->bihe", weights, values.astype(dtype)).astype(q.dtype)
    if not return_state:
        return y

    g_tokens = g_queries.transpose(0, 2, 1)  # (B, N, H)
    if cache is None:
        state = KVCache(keys=k, values=v, log_decay_cumsum=g_tokens, log_decay_total=g_tokens[:, -1],
                        length=jnp.asarray(length, jnp.int32))
    else:
        zero = jnp.zeros((), cache.length.dtype)
        start = (zero, cache.length, zero, zero)
        state = KVCache(
            keys=jax.lax.dynamic_update_slice(cache.keys, k.astype(cache.keys.dtype), start),
            values=jax.lax.dynamic_update_slice(cache.values, v.astype(cache.values.dtype), start),
            log_decay_cumsum=jax.lax.dynamic_update_slice(
                cache.log_decay_cumsum, g_tokens.astype(cache.log_decay_cumsum.dtype), start[:3]),
            log_decay_total=g_tokens[:, -1].astype(cache.log_decay_total.dtype),
            length=cache.length + length,
        )
    return y, state
