"""One-token recurrent step of every variant: constant cost per token for powers 1 and 2, a KV cache for exp."""

from __future__ import annotations

import jax.numpy as jnp

from twomamba_jax.ops.features import feature_map
from twomamba_jax.ops.numerics import compute_dtype, normalized
from twomamba_jax.ops.reference import reference_attention
from twomamba_jax.ops.state import RecurrentState


def recurrent_step(q_t, k_t, v_t, log_decay_t, state, *, power, normalize, scale):
    """Advance ``state`` by one token. q_t, k_t: (B, H, dk); v_t: (B, H, dv); log_decay_t: (B, H) or None.

    Powers 1, 2: ``S <- exp(a_t) S + phi(k_t) [v_t, 1]^T``, ``y_t = phi(q_t)^T S[:, :dv] / phi(q_t)^T S[:, dv]``.
    Returns (y_t (B, H, dv) in q_t's dtype, new state).
    """
    if power == "exp":
        y, state = reference_attention(
            q_t[:, None], k_t[:, None], v_t[:, None], None if log_decay_t is None else log_decay_t[:, None],
            power=power, normalize=normalize, scale=scale, initial_state=state, return_state=True,
        )
        return y[:, 0], state
    dtype = compute_dtype(q_t, k_t, v_t)
    phi_q = feature_map((q_t * scale).astype(dtype), power)  # (B, H, F)
    phi_k = feature_map(k_t.astype(dtype), power)
    decay = jnp.ones(q_t.shape[:2], dtype) if log_decay_t is None else jnp.exp(log_decay_t.astype(dtype))
    numerator = decay[..., None, None] * state.numerator + phi_k[..., :, None] * v_t.astype(dtype)[..., None, :]
    normalizer = None
    if normalize:
        normalizer = decay[..., None] * state.normalizer + phi_k
    y = normalized(
        jnp.einsum("bhf,bhfe->bhe", phi_q, numerator),
        None if normalizer is None else jnp.einsum("bhf,bhf->bh", phi_q, normalizer),
    )
    # The state keeps its dtype, so it can be a lax.scan carry.
    new_state = RecurrentState(
        numerator=numerator.astype(state.numerator.dtype),
        normalizer=None if normalizer is None else normalizer.astype(state.normalizer.dtype),
    )
    return y.astype(q_t.dtype), new_state
