"""The chunked algorithm of SPEC section 2 in plain jnp: the portable fallback on every backend.

The sequence is cut into chunks of C tokens. Inside a chunk the weights are a small masked quadratic;
across chunks everything flows through the state ``S`` (F x dv, plus an F-vector normalizer), which obeys
``S_c = exp(gamma_last_c) S_{c-1} + B_c``. That recurrence over chunks runs either sequentially
(``lax.scan``, body rematerialized so the backward keeps only one state per chunk) or as a log-depth
``lax.associative_scan`` over the chunk summaries ``(gamma_last_c, B_c)``.

Memory is O(N): per-chunk states and per-chunk C x C tiles, never per-token states or an N x N matrix.
The last chunk is zero-padded: zero keys add nothing to the state and zero log-decays decay nothing,
so any N works and the final state is exact.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from twomamba_jax.ops.features import feature_map
from twomamba_jax.ops.numerics import compute_dtype, masked_decay, normalized, zero_log_decay
from twomamba_jax.ops.state import RecurrentState, init_state


class ChunkDecay(NamedTuple):
    """A chunk's log-decays, exact with -inf entries (document starts: ``numerics.with_document_starts``).

    gamma: (..., C) the chunk-local cumulative sum of the finite log-decays; resets: (..., C) int32, how many -inf
    entries the chunk holds up to each token. Tokens i >= j of one chunk are joined by ``gamma_i - gamma_j``
    where their reset counts agree, and by -inf (nothing) where a -inf lies between; without -inf entries every
    count is 0 and these are the plain cumulative-sum forms."""
    gamma: jax.Array
    resets: jax.Array

    @classmethod
    def of(cls, log_decay):
        infinite = jnp.isneginf(log_decay)
        return cls(jnp.cumsum(jnp.where(infinite, 0, log_decay), axis=-1),
                   jnp.cumsum(infinite.astype(jnp.int32), axis=-1))

    def within(self):
        """exp of the log-decay from token j to token i >= j, 0 above the diagonal: (..., C, C)."""
        size = self.gamma.shape[-1]
        joined = jnp.tril(jnp.ones((size, size), bool)) & (self.resets[..., :, None] == self.resets[..., None, :])
        return masked_decay(self.gamma, self.gamma, joined)

    def from_start(self):
        """The log-decay from the chunk's start (the state before it) to each token: (..., C)."""
        return jnp.where(self.resets > 0, -jnp.inf, self.gamma)

    def to_end(self):
        """The log-decay from each token to the chunk's last: (..., C)."""
        last = self.resets[..., -1:]
        return jnp.where(self.resets == last, self.gamma[..., -1:] - self.gamma, -jnp.inf)

    def total(self):
        """The chunk's whole log-decay: (...,)."""
        return jnp.where(self.resets[..., -1] > 0, -jnp.inf, self.gamma[..., -1])


def _to_chunks(x, num_chunks, chunk_size):
    """(B, N, H, ...) -> (num_chunks, B, H, C, ...), zero-padding N up to num_chunks * C."""
    batch, length, heads = x.shape[:3]
    pad = num_chunks * chunk_size - length
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(batch, num_chunks, chunk_size, heads, *x.shape[3:])
    return jnp.moveaxis(x, (1, 3), (0, 2))


def _from_chunks(y, length):
    """(num_chunks, B, H, C, dv) -> (B, N, H, dv), dropping the padding."""
    num_chunks, batch, heads, chunk_size, dv = y.shape
    y = jnp.moveaxis(y, (0, 2), (1, 3)).reshape(batch, num_chunks * chunk_size, heads, dv)
    return y[:, :length]


def _chunk_output(q, k, v, decay, state, *, power, normalize):
    """Outputs of one chunk given the state before it.

    q, k: (B, H, C, dk) with q pre-scaled; v: (B, H, C, dv); decay: the chunk's ``ChunkDecay``, (B, H, C) each.
    Returns y: (B, H, C, dv).
    """
    scores = jnp.einsum("bhid,bhjd->bhij", q, k)
    weights = (scores if power == 1 else scores**2) * decay.within()
    inflow = jnp.exp(decay.from_start())[..., None] * feature_map(q, power)  # (B, H, C, F)
    numerator = weights @ v + inflow @ state.numerator
    normalizer = None
    if normalize:
        normalizer = weights.sum(-1) + jnp.einsum("bhcf,bhf->bhc", inflow, state.normalizer)
    return normalized(numerator, normalizer)


def _chunk_summary(k, v, decay, *, power, normalize):
    """What one chunk adds to the state: ``B_c = sum_j exp(gamma_last - gamma_j) phi(k_j) [v_j, 1]^T``."""
    key_weights = jnp.exp(decay.to_end())[..., None] * feature_map(k, power)  # (B, H, C, F)
    return RecurrentState(
        numerator=jnp.einsum("bhcf,bhce->bhfe", key_weights, v),
        normalizer=key_weights.sum(-2) if normalize else None,
    )


def _decay_state(state, log_factor):
    """``exp(log_factor) * state`` with log_factor (..., B, H) broadcast over the feature axes."""
    factor = jnp.exp(log_factor)
    return RecurrentState(
        numerator=factor[..., None, None] * state.numerator,
        normalizer=None if state.normalizer is None else factor[..., None] * state.normalizer,
    )


def _add_states(a, b):
    return jax.tree.map(jnp.add, a, b)


def chunked_attention(
    q, k, v, log_decay, *, power, normalize, scale, chunk_size, state_pass="scan",
    initial_state=None, return_state=False,
):
    """Decayed attention for powers 1 and 2 via chunks; ``state_pass`` is "scan" or "associative".

    Shapes as ``twomamba_jax.ops.decayed_attention``; returns y (B, N, H, dv) or (y, RecurrentState).
    """
    dtype = compute_dtype(q, k, v)
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    num_chunks = -(-length // chunk_size)
    if log_decay is None:
        log_decay = zero_log_decay(q)
    qc = _to_chunks((q * scale).astype(dtype), num_chunks, chunk_size)
    kc = _to_chunks(k.astype(dtype), num_chunks, chunk_size)
    vc = _to_chunks(v.astype(dtype), num_chunks, chunk_size)
    decay = ChunkDecay.of(_to_chunks(log_decay.astype(dtype), num_chunks, chunk_size))

    if initial_state is None:
        initial_state = init_state(batch, heads, dk, dv, power=power, normalize=normalize)
    state0 = jax.tree.map(lambda s: s.astype(dtype), initial_state)
    output = functools.partial(_chunk_output, power=power, normalize=normalize)
    summary = functools.partial(_chunk_summary, power=power, normalize=normalize)

    if state_pass == "scan":

        @jax.checkpoint
        def step(state, chunk):
            q_c, k_c, v_c, d_c = chunk
            y_c = output(q_c, k_c, v_c, d_c, state)
            state = _add_states(_decay_state(state, d_c.total()), summary(k_c, v_c, d_c))
            return state, y_c

        final_state, y = jax.lax.scan(step, state0, (qc, kc, vc, decay))
    elif state_pass == "associative":
        summaries = jax.vmap(summary)(kc, vc, decay)

        def combine(earlier, later):
            (log_a1, s1), (log_a2, s2) = earlier, later
            return log_a1 + log_a2, _add_states(_decay_state(s1, log_a2), s2)

        log_carry, inclusive = jax.lax.associative_scan(combine, (decay.total(), summaries))
        # State after chunk c = decayed initial state + everything the chunks up to c added.
        after = _add_states(_decay_state(jax.tree.map(lambda s: s[None], state0), log_carry), inclusive)
        before = jax.tree.map(lambda s0, s: jnp.concatenate([s0[None], s[:-1]], axis=0), state0, after)
        y = jax.vmap(output)(qc, kc, vc, decay, before)
        final_state = jax.tree.map(lambda s: s[-1], after)
    else:
        raise ValueError(f"state_pass: expected 'scan' or 'associative'; got {state_pass!r}")

    y = _from_chunks(y, length).astype(q.dtype)
    if not return_state:
        return y
    return y, final_state
