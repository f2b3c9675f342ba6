"""Array layouts the kernels share: heads first, tokens padded to whole blocks."""

from __future__ import annotations

import jax.numpy as jnp


def heads_first(x, padded_len):
    """(B, N, H, ...) -> (B*H, N_pad, ...), zero-padded along N."""
    batch, length, heads = x.shape[:3]
    x = jnp.moveaxis(x, 2, 1).reshape(batch * heads, length, *x.shape[3:])
    return jnp.pad(x, [(0, 0), (0, padded_len - length)] + [(0, 0)] * (x.ndim - 2))


def heads_last(x, batch, length):
    """(B*H, N_pad, ...) -> (B, N, H, ...), dropping the padding."""
    x = x[:, :length]
    return jnp.moveaxis(x.reshape(batch, -1, *x.shape[1:]), 1, 2)
