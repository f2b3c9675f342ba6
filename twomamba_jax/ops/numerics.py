"""Numerical conventions shared by every implementation of the ops."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Softmax-normalized outputs divide by a sum of non-negative weights; a sum that is exactly zero
# (e.g. a ReLU that zeroed every key) must give 0, not NaN.
NORMALIZER_EPS = 1e-8


def compute_dtype(*xs: jax.Array) -> jnp.dtype:
    """float32 for half-precision inputs (decays, cumsums and accumulators need it), float64 for float64."""
    return jnp.result_type(jnp.float32, *(x.dtype for x in xs))


def zero_log_decay(q: jax.Array) -> jax.Array:
    """Log-decays of 0 ("no decay") for q (B, N, H, d): (B, N, H) float32.

    Made from q rather than as a constant: XLA evaluates cumulative sums of constant arrays at compile time, which
    made a model without decay take minutes to compile on GPU (175 s for a train step against 11 s with a decay,
    6 layers x 512, 32 x 1024 tokens). ``0 * x`` is never simplified to a constant for floats (x may be NaN).
    """
    return q[..., 0].astype(jnp.float32) * 0.0


def normalized(numerator: jax.Array, normalizer: jax.Array | None) -> jax.Array:
    """``numerator / normalizer`` with the normalizer broadcast over the last (value) axis; identity when None."""
    if normalizer is None:
        return numerator
    return numerator / jnp.maximum(normalizer, NORMALIZER_EPS)[..., None]


def masked_decay(g_query: jax.Array, g_key: jax.Array, mask: jax.Array) -> jax.Array:
    """``exp(g_i - g_j)`` where mask, else 0, masking before the exp so no inf (and no inf * 0) appears."""
    return jnp.exp(jnp.where(mask, g_query[..., :, None] - g_key[..., None, :], -jnp.inf))


def segment_sums(log_decay: jax.Array) -> jax.Array:
    """``out[..., i, j] = sum_{j < t <= i} a_t`` for j <= i, -inf above the diagonal: (..., N) -> (..., N, N).

    The exact log-decay between every pair of tokens, summed directly rather than as a difference of one long
    cumulative sum, which loses precision once |cumsum| is large (SPEC section 2). O(N^2): for the dense form.
    """
    length = log_decay.shape[-1]
    below = jnp.tril(jnp.ones((length, length), bool), -1)
    sums = jnp.cumsum(jnp.where(below, log_decay[..., :, None], 0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((length, length), bool)), sums, -jnp.inf)


def row_segment_sums(log_decay: jax.Array, rows: jax.Array) -> jax.Array:
    """The rows ``rows`` (R,) int of ``segment_sums``: (..., N) -> (..., R, N), summed directly as well (from
    token i down), so a long prompt can be attended in blocks of query rows."""
    tokens = jnp.arange(log_decay.shape[-1])
    causal = tokens <= rows[:, None]  # (R, N)
    within = jnp.where(causal, log_decay[..., None, :], 0)
    from_token = jnp.flip(jnp.cumsum(jnp.flip(within, -1), -1), -1)  # sum over j <= t <= i
    after_token = jnp.concatenate([from_token[..., 1:], jnp.zeros_like(from_token[..., :1])], -1)  # j < t <= i
    return jnp.where(causal, after_token, -jnp.inf)


def suffix_sums(log_decay: jax.Array) -> jax.Array:
    """``out[..., j] = sum_{t > j} a_t`` along the last axis: the log-decay from token j to the last token
    (summed, not a difference: exact where some a_t is -inf)."""
    from_token = jnp.flip(jnp.cumsum(jnp.flip(log_decay, -1), -1), -1)
    return jnp.concatenate([from_token[..., 1:], jnp.zeros_like(from_token[..., :1])], -1)


# The log-decay the Pallas kernels take at a document start, for 16-bit operands: a finite stand-in for -inf. The
# kernels difference block-local cumulative sums (-inf - -inf is NaN), and every factor they exponentiate is <= 0,
# so exp(-256) = 0 in float32 (below its smallest subnormal, as is exp(-256 / 2) for the powers' square-root
# factors) zeroes every weight across a start exactly, exp's too unless its scores spread over 150 within a row.
# The price: a block's sums then carry c * 256 after c starts, and g_i - g_j of two tokens after them loses bits
# below that magnitude's float32 spacing, 3e-5 for one start in a block and 5e-4 for 16 (relative weight error,
# against bfloat16's 4e-3 rounding): fine for 16-bit operands, not for float32 ones (which the jnp forms take).
KERNEL_DOCUMENT_START = -256.0


def with_document_starts(log_decay: jax.Array, segment_ids: jax.Array, at_start: float = -jnp.inf) -> jax.Array:
    """``log_decay`` (B, N, H) with ``at_start`` (-inf: a decay of exactly zero) at each document start of
    ``segment_ids`` (B, N) (a token whose id differs from the one before), so nothing before a document reaches
    it.

    Every dense and chunked form takes such a log-decay exactly: they sum decays between tokens, or mask pairs
    whose span holds a -inf (``ChunkDecay``), and never subtract two sums that both hold one. The kernels take
    ``KERNEL_DOCUMENT_START`` instead."""
    return jnp.where(document_starts(segment_ids)[..., None], at_start, log_decay)


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """(B, N) bool: True where a token's id differs from the one before (the first token starts nothing)."""
    return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                           axis=1)
