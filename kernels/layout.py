"""What both kernel families share: the operands they take, and array layouts (heads first, tokens padded to whole
blocks)."""

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


KERNEL_DIMS = (16, 32, 64, 128)  # head dims the kernels take: powers of two (Triton blocks)
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)  # float16 operands would overflow on rounded-down f32 values


def unsupported_dims(q, v) -> str | None:
    """Why the head dims of q (dk) and v (dv) are not ones the kernels take, or None."""
    for name, dim in (("dk", q.shape[-1]), ("dv", v.shape[-1])):
        if dim not in KERNEL_DIMS:
            return f"{name}={dim} (expected one of {KERNEL_DIMS})"
    return None


def unsupported_dtypes(q, k, v) -> str | None:
    """Why the dtypes of q, k, v are not ones the kernels take, or None."""
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype} (expected float32 or bfloat16, the same for all)"
    return None
