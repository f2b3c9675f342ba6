"""``parallel_attention_pallas``: the flash-style kernels joined to their backward by custom_vjp.

Residuals are the inputs, the output (for normalized powers its float32 value: see ``_normalized_cotangents``) and
one float32 statistic per token (the normalizer, or the log-normalizer for normalized exp); nothing of size N^2
is ever stored. The log-decay cotangent per token is the row sums minus the column sums of ``dW * W`` (from the
backward kernels), turned into the cotangent of ``a`` by a reverse cumulative sum (g = cumsum(a)).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from twomamba_jax.kernels.layout import heads_first, heads_last, unsupported_dims, unsupported_dtypes
from twomamba_jax.kernels.parallel import mosaic_gpu, mosaic_gpu_backward
from twomamba_jax.kernels.parallel import tpu as tpu_kernels
from twomamba_jax.kernels.parallel import triton as triton_kernels
from twomamba_jax.ops.numerics import NORMALIZER_EPS, zero_log_decay
from twomamba_jax.ops.remat import named_forward

_HEADS_FIRST = {"triton": triton_kernels, "tpu": tpu_kernels}  # kernels on (B H, Np, d) operands

BACKENDS = ("triton", "mosaic_gpu", "tpu")
# Tokens per tile and decay block, per backend: 64 for Triton (registers; measured on the H200), 128 on the TPU (the
# MXU width) and for the Hopper kernels (their decay blocks; see mosaic_gpu.py for their tiles).
DEFAULT_BLOCK = {"triton": 64, "mosaic_gpu": mosaic_gpu.KEY_TILE, "tpu": 128}


def unsupported_reason(q, k, v, *, power) -> str | None:
    """Why the flash-style kernels cannot take these inputs, or None when they can."""
    if power not in (1, 2, "exp"):
        return f"power={power!r} (the flash-style kernels take 1, 2 and 'exp')"
    return unsupported_dims(q, v) or unsupported_dtypes(q, k, v)


def mosaic_gpu_unsupported_reason(q, k, v) -> str | None:
    """Why the Hopper (Mosaic GPU) kernels are not used for these inputs (the Triton kernels then run), or None:
    head dims 64 and 128 (the kernels take multiples of 64, but their shared-memory tiles and registers are sized
    for these two), bfloat16."""
    for name, dim in (("dk", q.shape[-1]), ("dv", v.shape[-1])):
        if dim not in (64, 128):
            return f"{name}={dim} (the wgmma kernels are dispatched for head dims 64 and 128)"
    if q.dtype != jnp.bfloat16:
        return f"dtype {q.dtype} (the wgmma kernels take bfloat16)"
    return None


class _Config(NamedTuple):
    power: int | str
    normalize: str | None
    scale: float
    block: int
    backend: str
    interpret: bool


def _decay(log_decay, padded, block):
    """Block-local inclusive cumulative log-decays (B H, Np) and each block's total (B H, Np / block), float32."""
    blocks = heads_first(log_decay.astype(jnp.float32), padded).reshape(-1, padded // block, block)
    g_local = jnp.cumsum(blocks, axis=-1)
    return g_local.reshape(-1, padded), g_local[..., -1]


def _padded_length(length, config):
    unit = mosaic_gpu.ROWS_PER_PROGRAM if config.backend == "mosaic_gpu" else config.block  # whole programs
    return -(-length // unit) * unit


def _pad_tokens(x, padded):
    return jnp.pad(x, [(0, 0), (0, padded - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, log_decay, config):
    return _forward(q, k, v, log_decay, config)[0][0]


def _normalized_power(config):
    return config.normalize is not None and config.power != "exp"


def _forward(q, k, v, log_decay, config, precise=False):
    """(y, ...) and the per-token statistic (B H, Np): y (B, N, H, dv) in v's dtype, or with ``precise`` (for
    the backward of normalized powers) y's float32 value as parts that sum to it: (y in float32) from the Triton
    and TPU kernels, (y, what its rounding left out) in v's dtype from the Hopper ones."""
    batch, length, heads, _ = q.shape
    padded = _padded_length(length, config)
    g_local, totals = _decay(log_decay, padded, config.block)
    options = dict(power=config.power, normalize=config.normalize, interpret=config.interpret)
    if config.backend == "mosaic_gpu":  # token-major operands, as they come
        *parts, stat = mosaic_gpu.forward(*(_pad_tokens(x, padded) for x in (q, k, v)), g_local, totals,
                                          scale=config.scale, low_part=precise, **options)
        return tuple(y[:, :length] for y in parts), stat
    kernels = _HEADS_FIRST[config.backend]
    y, stat = kernels.forward(*_heads_first(q, k, v, config.scale, padded), g_local, totals, block=config.block,
                              num_heads=heads, group=heads // k.shape[2],
                              y_dtype=jnp.float32 if precise else v.dtype, **options)
    return (heads_last(y, batch, length),), stat


def _heads_first(q, k, v, scale, padded):
    """q (scaled), k, v as the Triton and TPU kernels take them: (B H, Np, d)."""
    return heads_first((q.astype(jnp.float32) * scale).astype(q.dtype), padded), heads_first(k, padded), \
        heads_first(v, padded)


def _attention_fwd(q, k, v, log_decay, config):
    # Normalized powers keep y's float32 value for the backward's delta (see _normalized_cotangents).
    # Named, so that a rematerialized block can keep them rather than run this forward again (ops.remat).
    y_parts, stat = named_forward(_forward, q, k, v, log_decay, config, _normalized_power(config),
                                  static_argnums=(4, 5))
    return y_parts[0].astype(v.dtype), (q, k, v, log_decay, y_parts, stat)


def _attention_bwd(config, residuals, d_y):
    q, k, v, log_decay, y_parts, stat = residuals
    y = sum(part.astype(jnp.float32) for part in y_parts)
    batch, length, heads, _ = q.shape
    padded = stat.shape[1]
    g_local, totals = _decay(log_decay, padded, config.block)
    if _normalized_power(config):
        d_y, delta, stat = _normalized_cotangents(d_y, y, stat, q.dtype)
    elif config.normalize:
        delta = heads_first(jnp.sum(d_y.astype(jnp.float32) * y, axis=-1), padded)
    else:
        delta = jnp.zeros_like(stat)
    options = dict(power=config.power, normalize=config.normalize, interpret=config.interpret)
    if config.backend == "mosaic_gpu":
        dq, dk, dv, d_rows, d_cols = mosaic_gpu_backward.backward(
            *(_pad_tokens(x, padded) for x in (q, k, v)), g_local, totals, _pad_tokens(d_y, padded), stat, delta,
            scale=config.scale, **options)
        dq, dk, dv = (x[:, :length] for x in (dq, dk, dv))
    else:
        kernels = _HEADS_FIRST[config.backend]
        group = heads // k.shape[2]
        args = (*_heads_first(q, k, v, config.scale, padded), g_local, totals,
                heads_first(d_y.astype(jnp.float32), padded), stat, delta)
        options.update(block=config.block, num_heads=heads, group=group)
        dq, d_rows = kernels.backward_dq(*args, **options)
        dk, dv, d_cols = kernels.backward_dkv(*args, **options)
        # Per query head -> per key head: the heads of a group are adjacent.
        dk = dk.reshape(-1, group, *dk.shape[1:]).sum(1)
        dv = dv.reshape(-1, group, *dv.shape[1:]).sum(1)
        dq, dk, dv = heads_last(dq * config.scale, batch, length), heads_last(dk, batch, length), \
            heads_last(dv, batch, length)
    d_gamma = d_rows - d_cols  # g_i enters row i with +, column i with -
    d_log_decay = jnp.flip(jnp.cumsum(jnp.flip(d_gamma, -1), -1), -1)  # g = cumsum(a): da_s = sum_{t>=s} dg_t
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            heads_last(d_log_decay, batch, length).astype(log_decay.dtype))


_attention.defvjp(_attention_fwd, _attention_bwd)


def _normalized_cotangents(d_y, y, stat, dtype):
    """(dy', delta', the clipped normalizer) of a normalized power: the backward kernels take
    dW_ij = dy'_i . v_j - delta'_i with dy' = dy / den as their matmuls read it (rounded to ``dtype``) and
    delta' = dy' . y, y (float32) as the forward computed it before rounding (``_forward``'s ``precise``).

    Both from the same rounded dy', and y and den from the same rounded weights (the forward sums the normalizer
    from the weights its matmul reads; the Hopper forward only on the diagonal tile, which holds all the weights
    of the rows this is for), so that the two terms cancel where they should: a row with one weight
    (a document's first token) has y = v, dW = 0 and no gradient into q and k, where the kernel's rounding
    otherwise came back multiplied by 2 / s (dS = 2 s dW, den = s^2): dq errors of the order of the whole
    gradient for a small s. y = numerator / max(den, eps): no gradient through a clipped normalizer."""
    batch, padded = y.shape[0], stat.shape[1]
    clipped = stat <= NORMALIZER_EPS
    stat = jnp.maximum(stat, NORMALIZER_EPS)
    per_token = heads_last(stat, batch, y.shape[1])[..., None]  # (B, N, H, 1)
    d_y = (d_y.astype(jnp.float32) / per_token).astype(dtype)
    delta = heads_first(jnp.sum(d_y.astype(jnp.float32) * y, axis=-1), padded)
    return d_y, jnp.where(clipped, 0.0, delta), stat


def parallel_attention_pallas(q, k, v, log_decay=None, *, power, normalize, scale, block_size=None,
                              backend="triton", interpret=False):
    """Causal ``y_i = sum_{j<=i} f(s_ij) exp(g_i - g_j) v_j`` (optionally / its row sum), tiled, O(N) memory.

    q: (B, N, H, dk); k: (B, N, Hk, dk) and v: (B, N, Hk, dv) with Hk dividing H (grouped keys: query head h uses
    key head h // (H / Hk)); log_decay: (B, N, H) or None. Any N (padded to whole blocks of ``block_size``
    tokens, default ``DEFAULT_BLOCK``; a power of two for Triton, a multiple of 8 for the TPU). backend:
    "triton" (GPU), "mosaic_gpu" (Hopper: the wgmma kernels of ``mosaic_gpu.py`` and ``mosaic_gpu_backward.py``
    on token-major operands, block 128, bfloat16, head dims multiples of 64; dispatched where
    ``mosaic_gpu_unsupported_reason`` allows) or "tpu" (Mosaic TPU); the Triton and TPU kernels take heads-first
    copies (B H, N, d);
    ``interpret=True`` runs any of them in Pallas interpret mode. The caller checks ``unsupported_reason`` first.
    Returns y: (B, N, H, dv) in q's dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {tuple(BACKENDS)}; got {backend!r}")
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads or v.shape[2] != kv_heads:
        raise ValueError(f"k, v: expected a head count dividing q's {heads} (and equal for k and v); got "
                         f"{kv_heads} and {v.shape[2]}")
    if log_decay is None:
        log_decay = zero_log_decay(q)
    block_size = DEFAULT_BLOCK[backend] if block_size is None else block_size
    if backend == "mosaic_gpu" and block_size != mosaic_gpu.KEY_TILE:
        raise ValueError(f"block_size: the Mosaic GPU kernels take {mosaic_gpu.KEY_TILE}-token decay blocks; got "
                         f"{block_size}")
    config = _Config(power, normalize, float(scale), block_size, backend, interpret)
    return _attention(q, k, v, log_decay, config)
