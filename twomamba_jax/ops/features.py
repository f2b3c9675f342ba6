"""Feature maps that turn a power of the query-key inner product into a plain dot product.

Power 1 is the identity. Power 2 is the symmetric second-order map: one feature per pair a <= b,
``u_a * u_b``, times sqrt(2) when a != b, so that ``phi(q) . phi(k) == (q . k) ** 2`` with
``d (d + 1) / 2`` features instead of the ``d ** 2`` of the full outer product.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

def feature_size(dim: int, power: int) -> int:
    """Number of features ``phi`` produces for a head dim ``dim``: ``dim`` (power 1) or ``dim (dim + 1) / 2``."""
    return dim if power == 1 else dim * (dim + 1) // 2


@functools.cache
def _symmetric_pairs(dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = np.triu_indices(dim)
    weights = np.where(rows == cols, 1.0, np.sqrt(2.0))
    return rows, cols, weights


def feature_map(u: jax.Array, power: int) -> jax.Array:
    """``phi(u)``: (..., d) -> (..., feature_size(d, power)), in u's dtype."""
    if power == 1:
        return u
    rows, cols, weights = _symmetric_pairs(u.shape[-1])
    return u[..., rows] * u[..., cols] * weights.astype(u.dtype)
