"""``chunked_attention_pallas``: the chunked algorithm on the Pallas kernels, joined to a backward by custom_vjp.

The forward runs the two kernels of ``triton.py``. The backward is, for now, the VJP of the portable jnp chunked
form (``twomamba_jax.ops.chunked``) recomputed from the inputs: exact and O(N) in memory, but not yet a kernel.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from twomamba_jax.kernels.chunked import triton as triton_kernels
from twomamba_jax.kernels.chunked.features import feature_selectors
from twomamba_jax.ops.chunked import chunked_attention
from twomamba_jax.ops.features import feature_size
from twomamba_jax.ops.state import RecurrentState, init_state

KERNEL_DIMS = (16, 32, 64, 128)  # head dims the kernels take: powers of two (Triton blocks)
KERNEL_CHUNKS = (16, 32, 64, 128)
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
POWER2_FEATURE_BLOCK = 64


def unsupported_reason(q, v, *, power, chunk_size) -> str | None:
    """Why the kernels cannot take these inputs, or None when they can."""
    if power not in (1, 2):
        return f"power={power!r} (the chunked kernels take powers 1 and 2)"
    for name, dim in (("dk", q.shape[-1]), ("dv", v.shape[-1])):
        if dim not in KERNEL_DIMS:
            return f"{name}={dim} (expected one of {KERNEL_DIMS})"
    if chunk_size not in KERNEL_CHUNKS:
        return f"chunk_size={chunk_size} (expected one of {KERNEL_CHUNKS})"
    if q.dtype not in KERNEL_DTYPES or v.dtype != q.dtype:
        return f"dtypes q={q.dtype}, v={v.dtype} (expected one of float32, bfloat16, float16, the same for both)"
    return None


class _Config(NamedTuple):
    power: int
    normalize: str | None
    scale: float
    chunk_size: int
    interpret: bool


def _heads_first(x, padded_len):
    """(B, N, H, ...) -> (B*H, N_pad, ...), zero-padded along N."""
    batch, length, heads = x.shape[:3]
    x = jnp.moveaxis(x, 2, 1).reshape(batch * heads, length, *x.shape[3:])
    return jnp.pad(x, [(0, 0), (0, padded_len - length)] + [(0, 0)] * (x.ndim - 2))


def _forward(q, k, v, log_decay, numerator0, normalizer0, config: _Config):
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    chunk = config.chunk_size
    num_chunks = -(-length // chunk)
    padded = num_chunks * chunk
    block = dk if config.power == 1 else POWER2_FEATURE_BLOCK
    rows, cols, weights = feature_selectors(dk, config.power, block)
    features, padded_features = feature_size(dk, config.power), rows.shape[1]

    qh = _heads_first(q * jnp.asarray(config.scale, q.dtype), padded)
    kh, vh = _heads_first(k, padded), _heads_first(v, padded)
    # Chunk-local cumulative log-decay (zero-padded tokens decay nothing), in float32.
    gamma = jnp.cumsum(_heads_first(log_decay.astype(jnp.float32), padded).reshape(-1, num_chunks, chunk), -1)
    gamma_last = gamma[..., -1]
    key_decay = jnp.exp(gamma_last[..., None] - gamma).reshape(-1, padded)
    gamma = gamma.reshape(-1, padded)

    def state_in(x):  # (B, H, F, ...) -> (B*H, F_pad, ...)
        x = x.astype(jnp.float32).reshape(batch * heads, features, *x.shape[3:])
        return jnp.pad(x, [(0, 0), (0, padded_features - features)] + [(0, 0)] * (x.ndim - 2))

    operand = functools.partial(jnp.asarray, dtype=q.dtype)  # 0/1 selectors are exact in any float dtype
    selectors = (operand(rows), operand(cols), jnp.asarray(weights))
    common = dict(power=config.power, chunk_size=chunk, feature_block=block, interpret=config.interpret)
    numerators, normalizers, numerator, normalizer = triton_kernels.chunk_states(
        kh, vh, key_decay, jnp.exp(gamma_last), *selectors, state_in(numerator0), state_in(normalizer0), **common)
    y = triton_kernels.chunk_outputs(qh, kh, vh, gamma, numerators, normalizers, *selectors,
                                     normalize=config.normalize, **common)
    y = jnp.moveaxis(y[:, :length].reshape(batch, heads, length, dv), 1, 2)
    numerator = numerator[:, :features].reshape(batch, heads, features, dv)
    normalizer = normalizer[:, :features].reshape(batch, heads, features)
    return y, numerator, normalizer


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, log_decay, numerator0, normalizer0, config):
    return _forward(q, k, v, log_decay, numerator0, normalizer0, config)


def _attention_fwd(q, k, v, log_decay, numerator0, normalizer0, config):
    return _forward(q, k, v, log_decay, numerator0, normalizer0, config), (q, k, v, log_decay, numerator0,
                                                                           normalizer0)


def _attention_bwd(config, residuals, cotangents):
    def recompute(q, k, v, log_decay, numerator0, normalizer0):
        state0 = RecurrentState(numerator0, normalizer0 if config.normalize else None)
        y, state = chunked_attention(q, k, v, log_decay, power=config.power, normalize=config.normalize,
                                     scale=config.scale, chunk_size=config.chunk_size, initial_state=state0,
                                     return_state=True)
        # Without normalization the normalizer state is not an output the caller sees: its cotangent is zero.
        normalizer = state.normalizer if config.normalize else jnp.zeros_like(normalizer0)
        return y.astype(v.dtype), state.numerator.astype(jnp.float32), normalizer.astype(jnp.float32)

    _, vjp = jax.vjp(recompute, *residuals)
    return vjp(cotangents)


_attention.defvjp(_attention_fwd, _attention_bwd)


def chunked_attention_pallas(q, k, v, log_decay, *, power, normalize, scale, chunk_size, initial_state=None,
                             return_state=False, interpret=False):
    """Same contract as ``twomamba_jax.ops.chunked.chunked_attention``, on the Pallas kernels.

    The caller checks ``unsupported_reason`` first. ``interpret=True`` runs the kernels in Pallas interpret mode.
    """
    batch, _, heads, dk = q.shape
    dv = v.shape[-1]
    if log_decay is None:
        log_decay = jnp.zeros(q.shape[:3], jnp.float32)
    if initial_state is None:
        initial_state = init_state(batch, heads, dk, dv, power=power, normalize="softmax")
    normalizer0 = initial_state.normalizer
    if normalizer0 is None:
        normalizer0 = jnp.zeros(initial_state.numerator.shape[:-1], jnp.float32)
    config = _Config(power, normalize, float(scale), chunk_size, interpret)
    y, numerator, normalizer = _attention(q, k, v, log_decay, initial_state.numerator, normalizer0, config)
    if not return_state:
        return y
    return y, RecurrentState(numerator, normalizer if normalize else None)
