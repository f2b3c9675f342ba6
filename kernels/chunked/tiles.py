"""Math on one chunk's tiles, shared by the Triton (GPU) and Mosaic (TPU) kernels: what differs between them is
only how tiles reach the chip (pointers sliced by program id there, BlockSpecs and VMEM scratch here).

Float32 for everything but matmul operands; float32 operands are multiplied at full precision (no TF32).

phi tiles: the forward kernels get the pair indices of a feature block as (1, BF) int32 rows and build the block's
one-hot selectors (d, BF) on chip from an iota (``block_selectors``); the gradient kernel reads them; see
``features.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def dot(a, b, trans_b=False):
    """a @ b (or a @ b^T) with float32 accumulation; float32 operands at full precision."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    contract = (((1,), (1,)) if trans_b else ((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, contract, precision=precision, preferred_element_type=jnp.float32)


def one_hot(index, dim, dtype):
    """(1, BF) int32 row indices -> (dim, BF) one-hot columns in ``dtype``: column p is 1 in row ``index[0, p]``;
    an index that matches no row (the padding's -1) gives a zero column. Selected in float32, then cast (0 and 1
    are exact in any float dtype)."""
    row = jax.lax.broadcasted_iota(jnp.int32, (dim, index.shape[-1]), 0)
    return jnp.where(row == index, np.float32(1), np.float32(0)).astype(dtype)


def block_selectors(pair_rows, pair_cols, dim, dtype, power):
    """The one-hot selectors ``(rows, cols)`` (dim, BF) of one feature block, in the matmul operands' ``dtype``,
    from its (1, BF) int32 pair indices; None for power 1 (phi is the identity, no selectors are needed)."""
    if power == 1:
        return None
    return one_hot(pair_rows, dim, dtype), one_hot(pair_cols, dim, dtype)


def features(x, selectors, weights, power):
    """phi(x) for one feature block: (C, d) -> (C, BF) float32; ``selectors`` from ``block_selectors``."""
    return features_and_factors(x, selectors, weights, power)[0]


def features_and_factors(x, selectors, weights, power):
    """phi(x) and the factors ``(x @ rows, x @ cols)`` its VJP reuses (None for power 1)."""
    if power == 1:
        return x.astype(jnp.float32), None
    rows, cols = selectors
    by_rows, by_cols = dot(x, rows), dot(x, cols)
    return by_rows * by_cols * weights, (by_rows, by_cols)


def features_vjp(d_phi, factors, selectors, weights, power, dtype):
    """x-side of phi's VJP: (C, BF) cotangent of phi(x) -> (C, d) cotangent of x, float32; ``factors`` from
    ``features_and_factors``, ``dtype`` the matmul operands' (x's)."""
    if power == 1:
        return d_phi
    rows, cols = selectors
    by_rows, by_cols = factors
    d_phi = d_phi * weights
    return (dot((d_phi * by_cols).astype(dtype), rows, trans_b=True)
            + dot((d_phi * by_rows).astype(dtype), cols, trans_b=True))


def causal_decay(g_rows, g_cols, chunk_size):
    """The causal mask (C, C) and ``exp(g_i - g_j)`` on and below the diagonal, 0 above.

    g_rows: g as a column (C, 1), g_cols: g as a row (1, C). Masked before the exp: above the diagonal
    g_i - g_j >= 0 could overflow.
    """
    row = jax.lax.broadcasted_iota(jnp.int32, (chunk_size, chunk_size), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (chunk_size, chunk_size), 1)
    causal = row >= col
    return causal, jnp.exp(jnp.where(causal, g_rows - g_cols, -jnp.inf))
