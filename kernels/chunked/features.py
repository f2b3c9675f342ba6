"""Feature tiles built on chip: the index rows from which the kernels make phi(k) out of a (C, d) tile of keys.

For power 2, phi(k)_p = k_{a_p} k_{b_p} w_p over the pairs a_p <= b_p. The kernels take the pair indices as two
small int32 rows ``pair_rows`` = (a_p) and ``pair_cols`` = (b_p), (1, F), and build the one-hot selectors ``rows``
and ``cols`` (d, BF) of each feature block on chip from an iota (``tiles.block_selectors``); phi(k) is then
``(k @ rows) * (k @ cols) * weights``: two small matmuls on the tensor cores instead of a gather, so phi(k) is
never written to memory. The gradient kernel (``chunk_grads``) is the exception: it reads the (d, F) selectors
made outside (``tiles.one_hot``), since building them there made forward + backward 17-26% slower on the H200.
Features are padded to a multiple of the feature block with columns of index -1, which select no row and so give
zero features and change nothing.
"""

from __future__ import annotations

import functools

import numpy as np

from twomamba_jax.ops.features import _symmetric_pairs, feature_size

PADDING_INDEX = -1  # matches no row of the iota: the padding columns select nothing


@functools.cache
def feature_indices(dim: int, power: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``pair_rows``, ``pair_cols`` (1, F_pad) int32 and ``weights`` (1, F_pad) float32, F_pad a multiple of
    ``block``: feature p is ``x[a_p] * x[b_p] * weights[0, p]``, a_p = ``pair_rows[0, p]``, b_p = ``pair_cols[0, p]``
    (-1 on the padding)."""
    features = feature_size(dim, power)
    padded = -(-features // block) * block
    pair_rows = np.full((1, padded), PADDING_INDEX, np.int32)
    pair_cols = np.full((1, padded), PADDING_INDEX, np.int32)
    weights = np.zeros((1, padded), np.float32)
    if power == 1:  # phi is the identity: the kernels read x directly and ignore the indices
        pair_rows[0, :dim] = pair_cols[0, :dim] = np.arange(dim)
        weights[0, :dim] = 1.0
    else:  # the same pair order and weights as twomamba_jax.ops.features, so states are interchangeable
        a, b, pair_weights = _symmetric_pairs(dim)
        pair_rows[0, :features] = a
        pair_cols[0, :features] = b
        weights[0, :features] = pair_weights
    for array in (pair_rows, pair_cols, weights):
        array.flags.writeable = False  # cached: shared by every call
    return pair_rows, pair_cols, weights
