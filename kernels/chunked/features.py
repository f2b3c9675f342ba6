"""Feature tiles built on chip: the selectors that turn a (C, d) tile of keys into a (C, BF) tile of phi(k).

For power 2, phi(k)_p = k_{a_p} k_{b_p} w_p over the pairs a_p <= b_p. With one-hot selectors ``rows`` and ``cols``
(d, F) that is ``(k @ rows) * (k @ cols) * weights``: two small matmuls on the tensor cores instead of a gather,
so phi(k) is never written to memory. Features are padded to a multiple of the feature block with zero columns,
which give zero features and so change nothing.
"""

from __future__ import annotations

import functools

import numpy as np

from twomamba_jax.ops.features import _symmetric_pairs, feature_size


@functools.cache
def feature_selectors(dim: int, power: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-hot ``rows``, ``cols`` (dim, F_pad) and ``weights`` (1, F_pad), F_pad a multiple of ``block``."""
    features = feature_size(dim, power)
    padded = -(-features // block) * block
    rows = np.zeros((dim, padded), np.float32)
    cols = np.zeros((dim, padded), np.float32)
    weights = np.zeros((1, padded), np.float32)
    if power == 1:  # phi is the identity: the kernels read x directly and ignore the selectors
        rows[np.arange(dim), np.arange(dim)] = 1.0
        cols[:] = rows
        weights[0, :dim] = 1.0
    else:  # the same pair order and weights as twomamba_jax.ops.features, so states are interchangeable
        a, b, pair_weights = _symmetric_pairs(dim)
        rows[a, np.arange(features)] = 1.0
        cols[b, np.arange(features)] = 1.0
        weights[0, :features] = pair_weights
    for array in (rows, cols, weights):
        array.flags.writeable = False  # cached: shared by every call
    return rows, cols, weights
