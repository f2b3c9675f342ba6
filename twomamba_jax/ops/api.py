"""The public entry points: ``decayed_attention`` (whole sequences) and ``decayed_attention_step`` (one token)."""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp

from twomamba_jax.ops.chunked import chunked_attention
from twomamba_jax.ops.numerics import KERNEL_DOCUMENT_START, with_document_starts, zero_log_decay
from twomamba_jax.ops.recurrent import recurrent_step
from twomamba_jax.ops.reference import reference_attention
from twomamba_jax.ops.state import AttentionState, check_cache_room, check_state
from twomamba_jax.ops.validation import (check_non_negative_weights, check_normalize, check_positive_int, check_power,
                                         check_qkv, check_scale, check_segment_ids)

IMPLS = ("auto", "reference", "chunked", "associative", "pallas", "pallas_chunked", "pallas_parallel")
_logger = logging.getLogger(__name__)
# Which kernels each JAX backend runs (``jax.default_backend()`` at trace time); "cpu" runs the GPU kernels in
# Pallas interpret mode, for tests.
_KERNEL_BACKENDS = {"gpu": "triton", "tpu": "tpu"}
DEFAULT_CHUNK_SIZE = 64

# Up to this many tokens "auto" takes the dense form where no flash-style kernel runs: at short N one masked
# matmul beats the chunked form's F x dv state traffic. Measured on CPU (benchmarks/ops_cpu.py, power 2, d = 64):
# the forward passes cross near 1k tokens, forward + backward near 2k; memory of the dense form grows as N^2, so
# beyond this the chunked form is used.
DENSE_MAX_LEN = 2048
DENSE_MAX_ELEMENTS = 2**27  # B * H * N^2 above this (512 MiB per float32 tile) takes the chunked form at any N
# Tuning table, per backend (GPUs with and without wgmma apart) and power: up to this many tokens "pallas" takes
# the flash-style kernel, beyond it the chunked one. Measured on the H200 (benchmarks/RESULTS.md, H=16, d=64,
# bf16, fwd + bwd). With the Triton-lowered kernels ("gpu"): power 2 is faster flash-style at 2k / 4k / 8k tokens
# (1.5 / 4.6 / 16.4 ms against 6.9 / 13.0 / 25.4) and chunked at 32k (25.9 ms against ~4 x 16.4); power 1 is
# faster chunked at every length (0.67 against 1.34 ms at 2k). On Hopper (Mosaic GPU kernels), power 2 at one row:
# flash-style 4.42 ms at 16k tokens against the chunked kernels' 4.78, and 9.67 at 24k against chunked 9.41 at 32k
# (single-state walks in parts since). Inputs the Mosaic GPU kernels do not take keep the "gpu" entry; so does
# CPU, which runs the GPU kernels.
PARALLEL_MAX_LEN = {"gpu": {1: 0, 2: 8192}, "hopper": {1: 0, 2: 16384}, "cpu": {1: 0, 2: 8192}}
# Power 1 on Hopper: the Mosaic GPU chunked kernels walk each head's chunks in parts (8 at 16 heads, B = 1);
# measured on the H200 (fwd + bwd, 16 heads), Mosaic GPU against Triton 0.34 / 0.29 ms at 1 x 2048, 0.42 / 0.47
# at 4 x 2048, 0.38 / 1.01 at 1 x 8192, 1.23 / 3.81 at 1 x 32768. Below this many rows x heads x tokens, Triton.
HOPPER_POWER1_MIN_HEAD_TOKENS = 64 * 2048


def _dense_is_small(batch_heads: int, length: int) -> bool:
    return length <= DENSE_MAX_LEN and batch_heads * length * length <= DENSE_MAX_ELEMENTS


def _resolve_impl(impl: str, power, batch_heads: int, length: int, stateful: bool = False,
                  mosaic_gpu: bool = True) -> str:
    """The implementation a request runs: "reference", "chunked", "associative", "pallas_chunked" or
    "pallas_parallel" (kernel availability for the shapes is checked after, at the call). ``mosaic_gpu``: whether
    the Mosaic GPU flash-style kernels take the inputs (on a Hopper GPU they have their own tuning entry)."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}; got {impl!r}")
    if power == "exp" and impl in ("chunked", "associative", "pallas_chunked"):
        raise ValueError(f'impl: power="exp" has no finite state, so only the dense and flash-style forms exist; '
                         f'use impl="reference", "pallas_parallel", "pallas" or "auto"; got {impl!r}')
    backend, requested = jax.default_backend(), impl
    if impl == "auto":
        if backend == "gpu":  # measured: the tuning table chooses
            impl = "pallas"
        elif power == "exp":
            return "reference" if stateful or backend not in _KERNEL_BACKENDS else "pallas_parallel"
        elif _dense_is_small(batch_heads, length):
            return "reference"
        else:
            return "pallas_chunked" if backend in _KERNEL_BACKENDS else "chunked"
    if impl == "pallas":
        if power == "exp":
            impl = "pallas_parallel"
        elif stateful or length > PARALLEL_MAX_LEN.get(_tuning_key(backend, mosaic_gpu), {}).get(power, 0):
            return "pallas_chunked"
        else:
            impl = "pallas_parallel"
    if impl == "pallas_parallel" and stateful:  # the flash-style kernel takes no state in and gives none out
        fallback = "reference" if power == "exp" else "pallas_chunked"
        if requested != "auto":
            _log_fallback("a state in or out (initial_state / return_state)", fallback, requested, "flash-style")
        return fallback
    return impl


def _tuning_key(backend: str, mosaic_gpu: bool) -> str:
    """The tuning table's entry for ``backend``: GPUs with wgmma (Hopper) have their own, for the inputs its Mosaic
    GPU kernels take (``mosaic_gpu``; others run the Triton kernels, as elsewhere)."""
    return "hopper" if backend == "gpu" and mosaic_gpu and _has_wgmma() else backend


def _mosaic_gpu_takes(q, v) -> bool:
    """Whether the Mosaic GPU flash-style kernels take these inputs (head dims, dtype)."""
    from twomamba_jax.kernels.parallel import mosaic_gpu_unsupported_reason

    return mosaic_gpu_unsupported_reason(q, v, v) is None


@functools.cache
def _log_fallback(reason: str, fallback: str = "chunked", requested: str = "pallas", family: str = "Pallas") -> None:
    _logger.warning("decayed_attention: impl=%r cannot use the %s kernels for %s; using impl=%r", requested,
                    family, reason, fallback)


def _kernel(family: str, q, k, v, *, power, requested, normalize=None, **limits):
    """The Pallas kernels of ``family`` ("chunked" or "parallel") where they take these inputs on this backend
    (interpret mode on CPU), else None, said once; ``limits`` go to the family's ``unsupported_reason``. On a
    Hopper GPU the Mosaic GPU kernels where they take the inputs (the chunked ones also by ``normalize``)."""
    # Imported here: the kernels build on the ops, so the ops reach them only at call time.
    if family == "chunked":
        from twomamba_jax.kernels.chunked import chunked_attention_pallas as attention, unsupported_reason
        name, fallback = "chunked", "chunked"
    else:
        from twomamba_jax.kernels.parallel import parallel_attention_pallas as attention, unsupported_reason
        name, fallback = "flash-style", "reference" if power == "exp" else "pallas_chunked"
    backend = jax.default_backend()
    reason = unsupported_reason(q, k, v, power=power, **limits)
    if reason is None and backend not in (*_KERNEL_BACKENDS, "cpu"):
        reason = f"backend {backend!r} (the {name} kernels lower for GPU and TPU, and run interpreted on CPU)"
    if reason is not None:
        _log_fallback(reason, fallback, requested, "Pallas" if family == "chunked" else "flash-style")
        return None
    kernel_backend = _KERNEL_BACKENDS.get(backend, "triton")
    if family == "parallel" and backend == "gpu" and _has_wgmma() and _mosaic_gpu_takes(q, v):
        kernel_backend = "mosaic_gpu"  # else the Triton kernels, which take any head dim
    if family == "chunked" and backend == "gpu" and _has_wgmma():
        from twomamba_jax.kernels.chunked import hopper_unsupported_reason

        small = power == 1 and q.shape[0] * q.shape[2] * q.shape[1] < HOPPER_POWER1_MIN_HEAD_TOKENS
        if not small and hopper_unsupported_reason(q, k, v, power=power, normalize=normalize, **limits) is None:
            kernel_backend = "mosaic_gpu"  # else the Triton kernels
    return functools.partial(attention, backend=kernel_backend, interpret=backend == "cpu")


@functools.cache
def _has_wgmma() -> bool:
    """Whether the default GPU is a Hopper (compute capability 9.x), whose wgmma the Mosaic GPU kernels use."""
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


def _ungroup(k, v, heads: int):
    """Grouped keys and values (Hk < H heads) repeated to one per query head: query head h uses key head
    h // (H / Hk), so the copies of a key head are adjacent."""
    group = heads // k.shape[-2]
    if group == 1:
        return k, v
    return jnp.repeat(k, group, axis=-2), jnp.repeat(v, group, axis=-2)


def _keep_dtypes(new_state, old_state):
    """A state passed in comes back in the same dtypes (so it can be a lax.scan carry)."""
    if old_state is None:
        return new_state
    return jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, old_state)


def decayed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_decay: jax.Array | None = None,
    *,
    power: int | str,
    normalize: str | None,
    scale: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    impl: str = "auto",
    initial_state: AttentionState | None = None,
    return_state: bool = False,
    max_len: int | None = None,
    segment_ids: jax.Array | None = None,
):
    """Causal decayed attention ``y_i = sum_{j<=i} f(s_ij) exp(g_i - g_j) v_j`` (optionally / its row sum).

    Args:
      q: (B, N, H, dk) queries.
      k: (B, N, Hk, dk) keys; Hk divides H (grouped keys: query head h uses key head h // (H / Hk)).
      v: (B, N, Hk, dv) values; dv may differ from dk (Mamba-2: dk = d_state, dv = head dim).
      log_decay: (B, N, H) per-token log-decay ``a_t <= 0``; ``g = cumsum(a)``. None means no decay.
      power: 1 (f(s) = s), 2 (f(s) = s^2, 2Mamba) or "exp" (f(s) = exp(s), 2Mamba-E).
      normalize: "softmax" divides by ``sum_j w_ij`` (the weights must be >= 0: power 1 needs non-negative
        q, k, e.g. a ReLU, or the sum can cross zero; concrete inputs with negative entries are refused, traced
        ones cannot be checked); None leaves the sum unnormalized (the module's output RMSNorm follows).
      scale: ``s_ij = scale * q_i . k_j``; default ``1 / sqrt(dk)``.
      chunk_size: tokens per chunk for "chunked" and "associative"; N need not be a multiple of it.
      impl: "reference" (dense O(N^2)), "chunked" (lax.scan over chunks), "associative" (associative_scan
        over chunk summaries), "pallas_chunked" (the chunked Pallas kernels of ``twomamba_jax.kernels.chunked``:
        Triton on GPU, Mosaic on TPU, and on Hopper GPUs Mosaic GPU ones for power 2 at head dim 64, bfloat16,
        chunk 64), "pallas_parallel" (the flash-style kernels of
        ``twomamba_jax.kernels.parallel``, quadratic and tiled: Triton on GPU, Mosaic on TPU, Mosaic GPU on
        Hopper; no state in or out), "pallas" (the flash-style kernel for exp, and for powers 1, 2 up to
        ``PARALLEL_MAX_LEN`` tokens, the tuning table, per backend and for Hopper GPUs apart; the chunked kernel
        beyond or with a state), or "auto" ("pallas" on GPU; on TPU, with
        no crossover measured yet, the flash-style kernel for exp and, for powers, the dense form up to
        ``DENSE_MAX_LEN`` tokens while B * H * N^2 <= ``DENSE_MAX_ELEMENTS`` and the chunked kernels beyond;
        elsewhere the same with dense exp and "chunked"). On CPU the Pallas kernels run in interpret mode (the
        GPU ones). Shapes or backends a kernel does not take fall back with one log line: to "pallas_chunked"
        (or "reference" for exp) from the flash-style kernel, to "chunked" from the chunked one. Power "exp"
        has no finite state: it runs dense or flash-style.
      initial_state: the state of the tokens before this sequence, as returned with ``return_state=True``
        or made by ``init_state``: a ``RecurrentState`` (powers 1, 2) or a ``KVCache`` (exp; it must have room
        for N more tokens).
      return_state: also return the state after the last token, for ``decayed_attention_step``.
      max_len: power "exp" only, without ``initial_state``: the capacity of the KV cache returned with
        ``return_state`` (default N, i.e. full; give room for the tokens still to be decoded).
      segment_ids: (B, N) integers, the document of each token of packed rows (a new document wherever the id
        changes): no token attends to an earlier document, applied as a decay of exactly zero at each document
        start (with or without ``log_decay``), so ``initial_state`` reaches only the first document and the
        returned state holds only the last. The Pallas kernels take it for 16-bit operands, as a log-decay of
        ``KERNEL_DOCUMENT_START`` (-256: weights across a start are exactly 0 in them as well; within-document
        weights after a start carry up to ~5e-4 relative error, below bfloat16's rounding); with float32
        operands "pallas*" and "auto" run "chunked" (powers) or "reference" (exp) instead, said once.

    Returns:
      y: (B, N, H, dv) in q's dtype, or ``(y, state)`` with ``return_state=True``.
    """
    check_qkv(q, k, v, log_decay, token_axis=True)
    check_power(power)
    check_normalize(normalize)
    check_non_negative_weights(q, k, power=power, normalize=normalize)
    check_scale(scale)
    check_positive_int("chunk_size", chunk_size)
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    requested, impl = impl, _resolve_impl(impl, power, batch * heads, length,
                                          stateful=initial_state is not None or return_state,
                                          mosaic_gpu=_mosaic_gpu_takes(q, v))
    if max_len is not None:
        check_positive_int("max_len", max_len)
        if power != "exp" or initial_state is not None or max_len < length:
            raise ValueError(f'max_len: sizes the KV cache of power="exp" made without initial_state, and must '
                             f"be >= N = {length}; got {max_len} with power={power!r}")
    if initial_state is not None:
        check_state(initial_state, batch_size=batch, num_heads=heads, key_dim=dk, value_dim=dv,
                    power=power, normalize=normalize)
        if power == "exp":
            check_cache_room("initial_state", initial_state.keys.shape[1], initial_state.length, length)
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    kernel_log_decay = log_decay  # what the Pallas kernels take
    if segment_ids is not None:
        check_segment_ids(segment_ids, batch, length)
        log_decay = zero_log_decay(q) if log_decay is None else log_decay
        kernel_log_decay = with_document_starts(log_decay, segment_ids, KERNEL_DOCUMENT_START)
        log_decay = with_document_starts(log_decay, segment_ids)
        if impl in ("pallas_parallel", "pallas_chunked") and jnp.dtype(q.dtype).itemsize > 2:
            impl = "reference" if power == "exp" else "chunked"
            _log_fallback(f"segment_ids with {q.dtype} operands (the kernels mask documents for 16-bit ones)",
                          impl, requested)

    common = dict(power=power, normalize=normalize, scale=scale, initial_state=initial_state,
                  return_state=return_state)
    if impl == "pallas_parallel":
        kernel = _kernel("parallel", q, k, v, power=power, requested=requested)
        if kernel is not None:
            return kernel(q, k, v, kernel_log_decay, power=power, normalize=normalize, scale=scale)
        impl = "reference" if power == "exp" else "pallas_chunked"
    k, v = _ungroup(k, v, heads)  # only the flash-style kernels read grouped keys in place
    kernel = None
    if impl == "pallas_chunked":
        kernel = _kernel("chunked", q, k, v, power=power, chunk_size=chunk_size, requested=requested,
                         normalize=normalize)
    if impl == "reference":
        out = reference_attention(q, k, v, log_decay, max_len=max_len, **common)
    elif kernel is not None:
        out = kernel(q, k, v, kernel_log_decay, chunk_size=chunk_size, **common)
    else:
        state_pass = "associative" if impl == "associative" else "scan"
        out = chunked_attention(q, k, v, log_decay, chunk_size=chunk_size, state_pass=state_pass, **common)
    if return_state:
        y, state = out
        return y, _keep_dtypes(state, initial_state)
    return out


def decayed_attention_step(
    q_t: jax.Array,
    k_t: jax.Array,
    v_t: jax.Array,
    log_decay_t: jax.Array | None,
    state: AttentionState,
    *,
    power: int | str,
    normalize: str | None,
    scale: float | None = None,
):
    """One decoding step of ``decayed_attention``.

    Args:
      q_t: (B, H, dk); k_t: (B, Hk, dk) and v_t: (B, Hk, dv) with Hk dividing H; log_decay_t: (B, H) or None.
      state: from ``init_state`` or ``decayed_attention(..., return_state=True)``.

    Returns:
      (y_t (B, H, dv) in q_t's dtype, the state after this token, in the dtypes of ``state``).
    """
    check_qkv(q_t, k_t, v_t, log_decay_t, token_axis=False)
    check_power(power)
    check_normalize(normalize)
    check_non_negative_weights(q_t, k_t, power=power, normalize=normalize)
    check_scale(scale)
    batch, heads, dk = q_t.shape
    k_t, v_t = _ungroup(k_t, v_t, heads)
    check_state(state, batch_size=batch, num_heads=heads, key_dim=dk, value_dim=v_t.shape[-1],
                power=power, normalize=normalize, name="state")
    if power == "exp":
        check_cache_room("state", state.keys.shape[1], state.length, 1)
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    y, new_state = recurrent_step(q_t, k_t, v_t, log_decay_t, state, power=power, normalize=normalize, scale=scale)
    return y, _keep_dtypes(new_state, state)
