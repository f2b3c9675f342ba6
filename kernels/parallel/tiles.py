"""Math on one (query block, key block) tile of the flash-style kernels, shared by the GPU and TPU kernels.

The weight of key j for query i is ``f(s_ij) exp(g_i - g_j)`` on and below the diagonal, with f(s) = s, s^2 or
exp(s). ``diff`` carries ``g_i - g_j`` where the pair is causal and -inf elsewhere (masking before any exp). For
exp the weight is computed as one exponential, ``exp(s + diff - L_i)``, where L_i is the row's running max in the
forward (online softmax) and its log-normalizer in the backward (0 when unnormalized).
"""

from __future__ import annotations

import jax.numpy as jnp


def kv_head(head, num_heads, group):
    """The key / value head (of B * H / group) that query head ``head`` (of B * H) reads: heads of a group are
    adjacent."""
    return (head // num_heads) * (num_heads // group) + (head % num_heads) // group


def causal_diff(g_rows, g_cols, row_positions, col_positions, offset):
    """``g_i - g_j`` (block-local cumsums plus the sum of the blocks between) where j <= i, else -inf.

    g_rows: (BQ, 1), g_cols: (1, BK) local inclusive cumsums; positions likewise; offset: the log-decay of the
    whole blocks from the key block to the query block (0 on the diagonal)."""
    causal = row_positions >= col_positions
    return jnp.where(causal, (g_rows - g_cols) + offset, -jnp.inf)


def weights(s, diff, power, log_normalizer=None):
    """Tile weights (BQ, BK) float32, 0 where masked. For exp, ``log_normalizer`` (BQ, 1) is subtracted inside
    the exponential."""
    if power == "exp":
        return jnp.exp(s + diff - (0.0 if log_normalizer is None else log_normalizer))
    decay = jnp.exp(diff)
    return (s if power == 1 else s * s) * decay


def score_and_decay_grads(s, diff, d_weights, w, power):
    """(d s, the log-decay cotangent ``T_ij = dW_ij * W_ij`` of the tile) from the weights' cotangent dW.

    For exp, d s = dW * W (the weight is its own derivative); for powers, d s = dW * f'(s) * exp(diff)."""
    through_decay = d_weights * w
    if power == "exp":
        return through_decay, through_decay
    decay = jnp.exp(diff)
    return d_weights * decay * (1.0 if power == 1 else 2.0 * s), through_decay


def tile_grads(s, diff, d_out_dot_v, stat, delta, power, normalize):
    """(the weights as the output sees them, d s, the log-decay cotangent) of one tile in the backward.

    d_out_dot_v: (BQ, BK) ``dy_i . v_j``; stat: (BQ, 1) the forward's log-normalizer (normalized exp); delta:
    (BQ, 1) ``dy . y`` (0 when unnormalized). Normalized powers take dy and delta already divided by the normalizer
    (``pallas._normalized_cotangents``), so that dW = dy'.v - delta' and their weights are seen as they are.
    """
    if power == "exp":
        w = weights(s, diff, power, stat if normalize else None)  # normalized exp: already divided
        d_weights = d_out_dot_v - delta if normalize else d_out_dot_v
    else:
        w = weights(s, diff, power)
        d_weights = d_out_dot_v - delta
    d_s, through_decay = score_and_decay_grads(s, diff, d_weights, w, power)
    return w, d_s, through_decay
