"""The public entry points: ``decayed_attention`` (whole sequences) and ``decayed_attention_step`` (one token)."""

from __future__ import annotations

import functools
import logging
import math

import jax

from twomamba_jax.ops.chunked import chunked_attention
from twomamba_jax.ops.recurrent import recurrent_step
from twomamba_jax.ops.reference import reference_attention
from twomamba_jax.ops.state import AttentionState, check_cache_room, check_state
from twomamba_jax.ops.validation import check_normalize, check_positive_int, check_power, check_qkv, check_scale

IMPLS = ("auto", "reference", "chunked", "associative", "pallas")
_logger = logging.getLogger(__name__)
# Which kernels each JAX backend runs (``jax.default_backend()`` at trace time); "cpu" runs the GPU kernels in
# Pallas interpret mode, for tests.
_KERNEL_BACKENDS = {"gpu": "triton", "tpu": "tpu"}
DEFAULT_CHUNK_SIZE = 64

# Up to this many tokens "auto" takes the dense form: at short N one masked matmul beats the chunked form's
# F x dv state traffic. Measured on CPU (benchmarks/ops_cpu.py, power 2, d = 64): the forward passes cross near
# 1k tokens, forward + backward near 2k; memory of the dense form grows as N^2, so beyond this the chunked form
# is used (its Pallas kernels on GPU).
DENSE_MAX_LEN = 2048
DENSE_MAX_ELEMENTS = 2**27  # B * H * N^2 above this (512 MiB per float32 tile) takes the chunked form at any N


def _resolve_impl(impl: str, power, batch_heads: int, length: int) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}; got {impl!r}")
    if power == "exp":
        if impl in ("chunked", "associative"):
            raise ValueError(
                f'impl: power="exp" has no finite state, so only the dense form exists; use impl="reference" '
                f'or "auto"; got {impl!r}'
            )
        if impl == "pallas":
            _log_fallback('power="exp" (its flash-style kernel is not written yet)', "reference")
        return "reference"
    if impl == "auto":
        if length <= DENSE_MAX_LEN and batch_heads * length * length <= DENSE_MAX_ELEMENTS:
            return "reference"
        # On an H200 the kernels run forward + backward 5-7x faster than the jnp form (benchmarks/RESULTS.md);
        # on CPU they only run interpreted.
        return "pallas" if jax.default_backend() in _KERNEL_BACKENDS else "chunked"
    return impl


@functools.cache
def _log_fallback(reason: str, fallback: str = "chunked", requested: str = "pallas") -> None:
    _logger.warning("decayed_attention: impl=%r cannot use the Pallas kernels for %s; using impl=%r", requested,
                    reason, fallback)


def _pallas_or_fallback(q, k, v, *, power, chunk_size, requested):
    """The Pallas kernels where they apply (interpret mode on CPU), else the jnp chunked form, said once."""
    # Imported here: the kernels build on the ops, so the ops reach them only at call time.
    from twomamba_jax.kernels.chunked import chunked_attention_pallas, unsupported_reason

    backend = jax.default_backend()
    reason = unsupported_reason(q, k, v, power=power, chunk_size=chunk_size)
    if reason is None and backend not in (*_KERNEL_BACKENDS, "cpu"):
        reason = f"backend {backend!r} (the chunked kernels lower for GPU and TPU, and run interpreted on CPU)"
    if reason is not None:
        _log_fallback(reason, requested=requested)
        return None
    return functools.partial(chunked_attention_pallas, backend=_KERNEL_BACKENDS.get(backend, "triton"),
                             interpret=backend == "cpu")


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
):
    """Causal decayed attention ``y_i = sum_{j<=i} f(s_ij) exp(g_i - g_j) v_j`` (optionally / its row sum).

    Args:
      q: (B, N, H, dk) queries.
      k: (B, N, H, dk) keys.
      v: (B, N, H, dv) values; dv may differ from dk (Mamba-2: dk = d_state, dv = head dim).
      log_decay: (B, N, H) per-token log-decay ``a_t <= 0``; ``g = cumsum(a)``. None means no decay.
      power: 1 (f(s) = s), 2 (f(s) = s^2, 2Mamba) or "exp" (f(s) = exp(s), 2Mamba-E).
      normalize: "softmax" divides by ``sum_j w_ij`` (the weights must be >= 0: power 1 needs non-negative
        q, k, e.g. a ReLU); None leaves the sum unnormalized (the module's output RMSNorm follows).
      scale: ``s_ij = scale * q_i . k_j``; default ``1 / sqrt(dk)``.
      chunk_size: tokens per chunk for "chunked" and "associative"; N need not be a multiple of it.
      impl: "reference" (dense O(N^2)), "chunked" (lax.scan over chunks), "associative" (associative_scan
        over chunk summaries), "pallas" (the chunked Pallas kernels of ``twomamba_jax.kernels.chunked``:
        Triton on GPU, Mosaic on TPU, the GPU kernels in interpret mode on CPU; shapes or backends they do not
        take fall back to "chunked" with one log line), or "auto" (dense up to ``DENSE_MAX_LEN`` tokens while
        B * H * N^2 <= ``DENSE_MAX_ELEMENTS``; beyond, "pallas" on GPU and TPU and "chunked" elsewhere). Power "exp" has no finite state and
        always runs dense.
      initial_state: the state of the tokens before this sequence, as returned with ``return_state=True``
        or made by ``init_state``: a ``RecurrentState`` (powers 1, 2) or a ``KVCache`` (exp; it must have room
        for N more tokens).
      return_state: also return the state after the last token, for ``decayed_attention_step``.
      max_len: power "exp" only, without ``initial_state``: the capacity of the KV cache returned with
        ``return_state`` (default N, i.e. full; give room for the tokens still to be decoded).

    Returns:
      y: (B, N, H, dv) in q's dtype, or ``(y, state)`` with ``return_state=True``.
    """
    check_qkv(q, k, v, log_decay, token_axis=True)
    check_power(power)
    check_normalize(normalize)
    check_scale(scale)
    check_positive_int("chunk_size", chunk_size)
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    requested, impl = impl, _resolve_impl(impl, power, batch * heads, length)
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

    common = dict(power=power, normalize=normalize, scale=scale, initial_state=initial_state,
                  return_state=return_state)
    pallas = None
    if impl == "pallas":
        pallas = _pallas_or_fallback(q, k, v, power=power, chunk_size=chunk_size, requested=requested)
    if impl == "reference":
        out = reference_attention(q, k, v, log_decay, max_len=max_len, **common)
    elif pallas is not None:
        out = pallas(q, k, v, log_decay, chunk_size=chunk_size, **common)
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
      q_t, k_t: (B, H, dk); v_t: (B, H, dv); log_decay_t: (B, H) or None.
      state: from ``init_state`` or ``decayed_attention(..., return_state=True)``.

    Returns:
      (y_t (B, H, dv) in q_t's dtype, the state after this token, in the dtypes of ``state``).
    """
    check_qkv(q_t, k_t, v_t, log_decay_t, token_axis=False)
    check_power(power)
    check_normalize(normalize)
    check_scale(scale)
    batch, heads, dk = q_t.shape
    check_state(state, batch_size=batch, num_heads=heads, key_dim=dk, value_dim=v_t.shape[-1],
                power=power, normalize=normalize, name="state")
    if power == "exp":
        check_cache_room("state", state.keys.shape[1], state.length, 1)
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    y, new_state = recurrent_step(q_t, k_t, v_t, log_decay_t, state, power=power, normalize=normalize, scale=scale)
    return y, _keep_dtypes(new_state, state)
