"""``chunked_attention_pallas``: the chunked algorithm on the Pallas kernels, joined to a backward by custom_vjp.

Forward: ``state_pass`` then ``chunk_outputs``. Backward: ``state_pass`` again (recomputing the per-chunk states
is one cheap pass, so the forward keeps none of its B H (N/C) F dv states as residuals; the backward
holds them and their cotangents, twice that, while it runs), ``state_pass(reverse=True)`` (the state cotangents,
chunks in reverse) and ``chunk_grads`` (dq, dk, dv and the log-decay cotangent, chunks in parallel); the
log-decay cotangent is a reverse cumulative sum within each chunk, done in jnp. (Backend "mosaic_gpu", which
``ops.decayed_attention`` picks on Hopper GPUs for power 2 and unnormalized power 1 at head dim 64, bfloat16,
chunk 64: the kernels of ``mosaic_gpu.py`` and ``mosaic_gpu_backward.py`` (power 2) and ``mosaic_gpu_power1.py``
instead, whose states stay on chip but for the backward's checkpoints every 16 or more chunks.)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from twomamba_jax.kernels.chunked import mosaic_gpu as hopper_kernels
from twomamba_jax.kernels.chunked import mosaic_gpu_backward as hopper_backward
from twomamba_jax.kernels.chunked import mosaic_gpu_power1 as hopper_power1
from twomamba_jax.kernels.chunked import tpu as tpu_kernels
from twomamba_jax.kernels.chunked import triton as triton_kernels
from twomamba_jax.kernels.chunked.features import feature_indices
from twomamba_jax.kernels.chunked.tiles import one_hot
from twomamba_jax.kernels.layout import heads_first, heads_last, unsupported_dims, unsupported_dtypes
from twomamba_jax.ops.numerics import NORMALIZER_EPS, zero_log_decay
from twomamba_jax.ops.features import feature_size
from twomamba_jax.ops.remat import named_forward
from twomamba_jax.ops.state import RecurrentState, init_state

KERNEL_CHUNKS = (16, 32, 64, 128)
BACKENDS = {"triton": triton_kernels, "tpu": tpu_kernels}
HOPPER = "mosaic_gpu"  # the Hopper kernels (mosaic_gpu.py, mosaic_gpu_backward.py)


def unsupported_reason(q, k, v, *, power, chunk_size) -> str | None:
    """Why the kernels cannot take these inputs, or None when they can."""
    if power not in (1, 2):
        return f"power={power!r} (the chunked kernels take powers 1 and 2)"
    if reason := unsupported_dims(q, v):
        return reason
    if chunk_size not in KERNEL_CHUNKS:
        return f"chunk_size={chunk_size} (expected one of {KERNEL_CHUNKS})"
    return unsupported_dtypes(q, k, v)


def hopper_unsupported_reason(q, k, v, *, power, chunk_size, normalize=None) -> str | None:
    """Why the Hopper (Mosaic GPU) chunked kernels cannot take these inputs, or None when they can."""
    if reason := hopper_kernels.unsupported_reason(q, k, v, power=power, normalize=normalize):
        return reason
    if chunk_size != hopper_kernels.CHUNK:
        return f"chunk_size={chunk_size} (the Hopper chunked kernels take {hopper_kernels.CHUNK})"
    return None


class _Config(NamedTuple):
    power: int
    normalize: str | None
    scale: float
    chunk_size: int
    backend: str  # a key of BACKENDS
    interpret: bool
    parts: int = 1  # Hopper: of the single-state walks (``mosaic_gpu.walk_parts``), decided once for both passes


class _Prepared(NamedTuple):
    """Inputs laid out for the kernels: heads first, N padded to whole chunks, features padded to whole blocks."""

    q: jax.Array  # (BH, Np, dk), pre-scaled
    k: jax.Array
    v: jax.Array  # (BH, Np, dv)
    gamma: jax.Array  # (BH, Np) float32, chunk-local cumulative log-decay
    key_decay: jax.Array  # (BH, Np) float32, exp(gamma_last - gamma)
    chunk_decay: jax.Array  # (BH, nc) float32, exp(gamma_last)
    pairs: tuple  # pair_rows, pair_cols (1, F_pad) int32, weights (1, F_pad) float32: the selectors' sources
    numerator0: jax.Array  # (BH, F_pad, dv) float32
    normalizer0: jax.Array  # (BH, F_pad) float32


def _kernel_options(q, config: _Config):
    dk = q.shape[-1]
    block = dk if config.power == 1 else BACKENDS[config.backend].power2_feature_block(feature_size(dk, 2))
    return dict(power=config.power, chunk_size=config.chunk_size, feature_block=block, interpret=config.interpret)


def _pad_features(x, padded_features):
    """(B, H, F, ...) -> (B*H, F_pad, ...) float32, zero-padded features."""
    x = x.astype(jnp.float32).reshape(-1, *x.shape[2:])
    return jnp.pad(x, [(0, 0), (0, padded_features - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _prepare(q, k, v, log_decay, numerator0, normalizer0, config: _Config, feature_block: int) -> _Prepared:
    length, dk = q.shape[1], q.shape[-1]
    chunk = config.chunk_size
    num_chunks = -(-length // chunk)
    padded = num_chunks * chunk
    pair_rows, pair_cols, weights = feature_indices(dk, config.power, feature_block)
    # Chunk-local cumulative log-decay (zero-padded tokens decay nothing), in float32.
    gamma = jnp.cumsum(heads_first(log_decay.astype(jnp.float32), padded).reshape(-1, num_chunks, chunk), -1)
    gamma_last = gamma[..., -1]
    padded_features = weights.shape[1]
    return _Prepared(
        q=heads_first((q.astype(jnp.float32) * config.scale).astype(q.dtype), padded),
        k=heads_first(k, padded),
        v=heads_first(v, padded),
        gamma=gamma.reshape(-1, padded),
        key_decay=jnp.exp(gamma_last[..., None] - gamma).reshape(-1, padded),
        chunk_decay=jnp.exp(gamma_last),
        pairs=(jnp.asarray(pair_rows), jnp.asarray(pair_cols), jnp.asarray(weights)),
        numerator0=_pad_features(numerator0, padded_features),
        normalizer0=_pad_features(normalizer0, padded_features),
    )


def _states(p: _Prepared, config: _Config, options):
    ones = jnp.ones_like(p.key_decay)
    return BACKENDS[config.backend].state_pass(p.k, p.v, p.key_decay, ones, p.chunk_decay, *p.pairs,
                                               p.numerator0, p.normalizer0, reverse=False, **options)


def _forward(q, k, v, log_decay, numerator0, normalizer0, config: _Config):
    """Returns ((y, final numerator, final normalizer), what the backward reads besides the inputs and y: the
    normalizer of every token (BH, Np) and, from the Hopper kernels, the final states and the walks' part starts)."""
    if config.backend == HOPPER:
        return _forward_hopper(q, k, v, log_decay, numerator0, normalizer0, config)
    batch, length, heads, dk = q.shape
    features = feature_size(dk, config.power)
    options = _kernel_options(q, config)
    p = _prepare(q, k, v, log_decay, numerator0, normalizer0, config, options["feature_block"])
    numerators, normalizers, numerator, normalizer = _states(p, config, options)
    y, token_normalizer = BACKENDS[config.backend].chunk_outputs(
        p.q, p.k, p.v, p.gamma, numerators, normalizers, *p.pairs, normalize=config.normalize, **options)
    numerator = numerator[:, :features].reshape(batch, heads, features, -1)
    normalizer = normalizer[:, :features].reshape(batch, heads, features)
    return (heads_last(y, batch, length), numerator, normalizer), (token_normalizer,)


def _forward_hopper(q, k, v, log_decay, numerator0, normalizer0, config: _Config):
    """``_forward`` on the Hopper kernels: for power 2 states in the full layout inside, symmetric outside."""
    batch, length, heads, _ = q.shape
    flat = lambda x: x.reshape(batch * heads, *x.shape[2:])
    padded = -(-length // config.chunk_size) * config.chunk_size
    if config.power == 1:  # unnormalized: no normalizer is carried (the caller drops it; it passes through)
        y, numerator, starts = hopper_power1.forward(q, k, v, log_decay, flat(numerator0).astype(jnp.float32),
                                                     scale=config.scale, parts=config.parts,
                                                     interpret=config.interpret)
        outputs = (y.astype(v.dtype), numerator.reshape(numerator0.shape).astype(numerator0.dtype), normalizer0)
        return outputs, (jnp.zeros((batch * heads, padded), jnp.float32), *outputs[1:], starts)
    y, den, numerator, normalizer, starts = hopper_kernels.forward(
        q, k, v, log_decay, *hopper_kernels.to_full(flat(numerator0), flat(normalizer0)), scale=config.scale,
        parts=config.parts, interpret=config.interpret)
    if config.normalize:
        y = y / jnp.maximum(den, NORMALIZER_EPS).reshape(batch, heads, length).transpose(0, 2, 1)[..., None]
    numerator, normalizer = hopper_kernels.to_symmetric(numerator, normalizer)
    outputs = (y.astype(v.dtype), numerator.reshape(numerator0.shape), normalizer.reshape(normalizer0.shape))
    return outputs, (jnp.pad(den, [(0, 0), (0, padded - length)]), *outputs[1:], starts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, log_decay, numerator0, normalizer0, config):
    return _forward(q, k, v, log_decay, numerator0, normalizer0, config)[0]


def _attention_fwd(q, k, v, log_decay, numerator0, normalizer0, config):
    # Named, so that a rematerialized block can keep them rather than run this forward again (ops.remat).
    outputs, saved = named_forward(_forward, q, k, v, log_decay, numerator0, normalizer0, config,
                                   static_argnums=(6,))
    return outputs, (q, k, v, log_decay, numerator0, normalizer0, outputs[0], *saved)


def _output_cotangents(d_y, y, token_normalizer, normalize, kernel_dtype=None):
    """(cotangent of the unnormalized output, of the normalizer): y = numerator / max(normalizer, eps) when
    normalized. d_y, y: (B H, Np, dv); token_normalizer: (B H, Np). ``kernel_dtype``: the dtype the kernels read
    the first in; the second is then taken from it as rounded (-d_num . y), so that the two cancel where they
    should: at a document's first token y = v, and any mismatch came back divided by its small normalizer."""
    if not normalize:
        return d_y, jnp.zeros_like(token_normalizer)
    safe = jnp.maximum(token_normalizer, NORMALIZER_EPS)
    d_num = d_y / safe[..., None]
    if kernel_dtype is not None:
        d_num = d_num.astype(kernel_dtype).astype(jnp.float32)
    d_den = jnp.where(token_normalizer > NORMALIZER_EPS, -jnp.sum(d_num * y, -1), 0.0)
    return d_num, d_den


def _backward_hopper(config, residuals, cotangents):
    """``_attention_bwd`` on the Hopper kernels: cotangents of the symmetric states to the full layout and back."""
    # The final states give the log-decay cotangent's <S, dS>; the starts are where the walks' parts began.
    q, k, v, log_decay, numerator0, normalizer0, y, token_normalizer, numerator, normalizer, starts = residuals
    d_y, d_numerator, d_normalizer = cotangents
    batch, length, heads, _ = q.shape
    if not config.normalize:  # the normalizer is no output the caller sees
        d_normalizer = jnp.zeros_like(d_normalizer)
    padded = token_normalizer.shape[1]
    d_out, d_den = _output_cotangents(heads_first(d_y.astype(jnp.float32), padded),
                                      heads_first(y.astype(jnp.float32), padded), token_normalizer, config.normalize,
                                      q.dtype)
    carried = (jnp.sum(numerator * d_numerator, axis=(2, 3)) + jnp.sum(normalizer * d_normalizer, axis=2))
    flat = lambda x: x.reshape(batch * heads, *x.shape[2:]).astype(jnp.float32)
    if config.power == 1:  # unnormalized: d_out is d_y, and the normalizer passed through
        dq, dk, dv, d_log_decay, d_numerator0 = hopper_power1.backward(
            q, k, v, log_decay, d_y, starts, flat(d_numerator), carried.reshape(-1), scale=config.scale,
            interpret=config.interpret)
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_log_decay.astype(log_decay.dtype),
                d_numerator0.reshape(numerator0.shape).astype(numerator0.dtype), d_normalizer.astype(normalizer0.dtype))
    dq, dk, dv, d_log_decay, *d_initial = hopper_backward.backward(
        q, k, v, log_decay, heads_last(d_out, batch, length), d_den[:, :length],
        hopper_kernels.to_full(flat(numerator0), flat(normalizer0))[0], starts,
        *hopper_kernels.to_symmetric_transpose(flat(d_numerator), flat(d_normalizer)), carried.reshape(-1),
        scale=config.scale, interpret=config.interpret)
    d_numerator0, d_normalizer0 = hopper_kernels.to_full_transpose(*d_initial)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_log_decay.astype(log_decay.dtype),
            d_numerator0.reshape(numerator0.shape).astype(numerator0.dtype),
            d_normalizer0.reshape(normalizer0.shape).astype(normalizer0.dtype))


def _attention_bwd(config, residuals, cotangents):
    """The chunk states are recomputed (one cheap pass) rather than stored from the forward."""
    if config.backend == HOPPER:
        return _backward_hopper(config, residuals, cotangents)
    q, k, v, log_decay, numerator0, normalizer0, y, token_normalizer = residuals
    d_y, d_numerator, d_normalizer = cotangents
    batch, length, heads, dk = q.shape
    features = feature_size(dk, config.power)
    options = _kernel_options(q, config)
    p = _prepare(q, k, v, log_decay, numerator0, normalizer0, config, options["feature_block"])
    numerators, normalizers, _, _ = _states(p, config, options)
    kernels = BACKENDS[config.backend]

    padded = p.q.shape[1]
    d_out, d_den = _output_cotangents(heads_first(d_y.astype(jnp.float32), padded),
                                      heads_first(y.astype(jnp.float32), padded), token_normalizer, config.normalize,
                                      q.dtype)
    if not config.normalize:  # the normalizer is no output the caller sees
        d_normalizer = jnp.zeros_like(d_normalizer)
    padded_features = p.numerator0.shape[1]
    d_states, d_normalizers, d_numerator0, d_normalizer0 = kernels.state_pass(
        p.q, d_out, jnp.exp(p.gamma), d_den, p.chunk_decay, *p.pairs, _pad_features(d_numerator, padded_features),
        _pad_features(d_normalizer, padded_features), reverse=True, **options)
    pair_rows, pair_cols, weights = p.pairs
    dq, dk_, dv, d_gamma = kernels.chunk_grads(
        p.q, p.k, p.v, p.gamma, p.key_decay, numerators, normalizers, d_states, d_normalizers, d_out, d_den,
        one_hot(pair_rows, dk, p.q.dtype), one_hot(pair_cols, dk, p.q.dtype), weights, **options)
    # gamma_t = sum_{s <= t} a_s inside a chunk, so da_s = sum_{t >= s} d_gamma_t (a reverse cumsum per chunk).
    d_gamma = d_gamma.reshape(-1, padded // config.chunk_size, config.chunk_size)
    d_log_decay = jnp.flip(jnp.cumsum(jnp.flip(d_gamma, -1), -1), -1).reshape(-1, padded)
    return (
        (heads_last(dq, batch, length) * config.scale).astype(q.dtype),
        heads_last(dk_, batch, length).astype(k.dtype),
        heads_last(dv, batch, length).astype(v.dtype),
        heads_last(d_log_decay, batch, length).astype(log_decay.dtype),
        d_numerator0[:, :features].reshape(numerator0.shape).astype(numerator0.dtype),
        d_normalizer0[:, :features].reshape(normalizer0.shape).astype(normalizer0.dtype),
    )


_attention.defvjp(_attention_fwd, _attention_bwd)


def chunked_attention_pallas(q, k, v, log_decay, *, power, normalize, scale, chunk_size, initial_state=None,
                             return_state=False, backend="triton", interpret=False):
    """Same contract as ``twomamba_jax.ops.chunked.chunked_attention``, on the Pallas kernels.

    The caller checks ``unsupported_reason`` first. ``backend``: "triton" (the GPU kernels of ``triton.py``),
    "tpu" (the Mosaic kernels of ``tpu.py``) or "mosaic_gpu" (Hopper: ``mosaic_gpu.py`` and
    ``mosaic_gpu_backward.py`` for power 2, ``mosaic_gpu_power1.py`` for unnormalized power 1; head dim 64,
    bfloat16, chunk_size 64, one key head per query head);
    all give the same results up to rounding. ``interpret=True`` runs them in Pallas interpret mode (the TPU or
    Mosaic GPU interpreter for those), on any machine.
    """
    if backend not in (*BACKENDS, HOPPER):
        raise ValueError(f"backend: expected one of {(*BACKENDS, HOPPER)}; got {backend!r}")
    if backend == HOPPER and (reason := hopper_unsupported_reason(q, k, v, power=power, chunk_size=chunk_size,
                                                                  normalize=normalize)):
        raise ValueError(f"backend={HOPPER!r}: {reason}")
    batch, _, heads, dk = q.shape
    dv = v.shape[-1]
    if log_decay is None:
        log_decay = zero_log_decay(q)
    if initial_state is None:
        initial_state = init_state(batch, heads, dk, dv, power=power, normalize="softmax")
    normalizer0 = initial_state.normalizer
    if normalizer0 is None:
        normalizer0 = jnp.zeros(initial_state.numerator.shape[:-1], jnp.float32)
    # The Hopper walks' parts, decided here, outside the forward's cached trace (``ops.remat.named_forward``):
    # a change of ``walk_parts``'s constants reaches it (the backward reads the forward's from its residuals).
    parts = hopper_kernels.walk_parts(batch * heads, -(-q.shape[1] // chunk_size)) if backend == HOPPER else 1
    config = _Config(power, normalize, float(scale), chunk_size, backend, interpret, parts)
    y, numerator, normalizer = _attention(q, k, v, log_decay, initial_state.numerator, normalizer0, config)
    if not return_state:
        return y
    return y, RecurrentState(numerator, normalizer if normalize else None)
