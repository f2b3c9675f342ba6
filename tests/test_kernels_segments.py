"""Document masking in the Pallas kernels (interpret mode on CPU): 16-bit operands with ``segment_ids`` take a
log-decay of ``KERNEL_DOCUMENT_START`` at each document start, and each document's outputs and gradients (q, k, v,
log-decay) match the float64 oracle on that document alone (bfloat16 tolerance, 1e-2), for the flash-style kernels
(Triton, TPU, Hopper) and the chunked ones (Triton, TPU, Hopper); what an earlier document holds changes nothing
after a start, bit for bit (the weights across it are exact zeros)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import each_document_alone, rel_error, segment_ids

from twomamba_jax import ops
from twomamba_jax.kernels.chunked import chunked_attention_pallas
from twomamba_jax.kernels.chunked import mosaic_gpu as hopper
from twomamba_jax.kernels.chunked import mosaic_gpu_backward as hopper_backward
from twomamba_jax.kernels.parallel import parallel_attention_pallas
from twomamba_jax.ops.numerics import KERNEL_DOCUMENT_START, with_document_starts

TOLERANCE, SCALE = 1e-2, 0.25
# Documents of 5, 1, 54, 4, 36 and 50 tokens (a start on a 64-token block's first token, one in the last block);
# for the Hopper kernels' 128-token programs, starts at 100, 128 (a program's first token), 200, 256 and 290 (the
# ragged end). One row: rows are independent programs.
STARTS = {150: [(0, 5, 6, 60, 64, 100)], 300: [(0, 5, 6, 100, 128, 200, 256, 290)]}


def _inputs(rng, length, dim, power, normalize, starts=()):
    """q, k, v (1, length, 2, dim) bfloat16 and the log-decay. At each of ``starts`` the token's own score is small
    (scale q.k = 0.02): a document's first token sees only itself, so y = v and q, k get no gradient, which a
    normalized power's backward must see through its rounding (the error comes back times 2 / s)."""
    shape = (1, length, 2, dim)
    q, k, v = (rng.standard_normal(shape) for _ in range(3))
    if power == 1 and normalize:
        q, k = np.abs(q), np.abs(k)
    else:
        for start in starts:
            q_m, k_m = q[0, start], k[0, start]  # (heads, dim)
            k_m -= (np.sum(q_m * k_m, -1) / np.sum(q_m * q_m, -1))[:, None] * q_m
            k_m += 0.02 / SCALE * q_m / np.sum(q_m * q_m, -1, keepdims=True)
    a = -np.log1p(np.exp(rng.standard_normal(shape[:3]) - 2.0)) / 4  # weights reach back across blocks
    return tuple(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)) + (jnp.asarray(a, jnp.float32),)


def _kernel(family, backend, power, normalize):
    """The kernel as ``decayed_attention`` runs it with segment ids: (q, k, v, a, ids) -> y."""
    options = dict(power=power, normalize=normalize, scale=SCALE, backend=backend, interpret=True)
    if family == "parallel":
        attention = functools.partial(parallel_attention_pallas, **options)
    else:
        attention = functools.partial(chunked_attention_pallas, chunk_size=64 if backend == "mosaic_gpu" else 16,
                                      **options)
    return lambda q, k, v, a, ids: attention(q, k, v, with_document_starts(a, ids, KERNEL_DOCUMENT_START))


def _check(rng, kernel, length, dim, power, normalize):
    starts = STARTS[length]
    ids = segment_ids(starts, length)
    q, k, v, a = _inputs(rng, length, dim, power, normalize, starts[0])
    cotangent = jnp.asarray(rng.standard_normal(q.shape))
    oracle = functools.partial(ops.decayed_attention, power=power, normalize=normalize, scale=SCALE,
                               impl="reference")
    alone = lambda q, k, v, a: each_document_alone(oracle, (q, k, v, a), starts)
    loss = lambda fn: jax.value_and_grad(lambda *args: jnp.sum(fn(*args).astype(jnp.float64) * cotangent),
                                         (0, 1, 2, 3))
    packed = jax.jit(lambda q, k, v, a: kernel(q, k, v, a, ids))
    y = packed(q, k, v, a)
    _, got = loss(packed)(q, k, v, a)
    upcast = [x.astype(jnp.float64) for x in (q, k, v, a)]
    _, expected = loss(alone)(*upcast)
    assert rel_error(y, alone(*upcast)) < TOLERANCE
    for name, g, e in zip("qkva", got, expected):
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert rel_error(g, e) < TOLERANCE, name
    # Exact zeros across a start: new q, k, v before the last document leave it as it was, bit for bit.
    last = starts[0][-1]
    other = [x.at[0, :last].set(jnp.asarray(rng.standard_normal(x[0, :last].shape), x.dtype)) for x in (q, k, v)]
    np.testing.assert_array_equal(np.asarray(packed(*other, a)[0, last:], np.float32),
                                  np.asarray(y[0, last:], np.float32))


TRITON_CASES = [("parallel", 1, None), ("parallel", 2, "softmax"), ("parallel", "exp", "softmax"),
                ("parallel", "exp", None), ("chunked", 2, None), ("chunked", 2, "softmax"), ("chunked", 1, "softmax")]


@pytest.mark.parametrize("family,power,normalize", TRITON_CASES)
def test_triton_kernels_mask_documents(rng, family, power, normalize):
    _check(rng, _kernel(family, "triton", power, normalize), 150, 16, power, normalize)


@pytest.mark.parametrize("family", ["parallel", "chunked"])
def test_tpu_kernels_mask_documents(rng, family):
    """The flash-style kernel and the chunked ones, normalized (the chunked ones take the log-decays as the Triton
    ones do, as factors <= 1)."""
    _check(rng, _kernel(family, "tpu", 2, "softmax"), 150, 16, 2, "softmax")


@pytest.mark.slow
@pytest.mark.parametrize("family,power,normalize", [("parallel", 2, "softmax"), ("parallel", "exp", "softmax"),
                                                    ("chunked", 2, "softmax"), ("chunked", 1, None)])
def test_hopper_kernels_mask_documents(rng, monkeypatch, family, power, normalize):
    """d = 64: the flash-style powers' one backward kernel and exp's two passes, and the chunked kernels (64-token
    chunks: starts inside a chunk and on a chunk's first token; the log-decay's cotangent in segments of one
    chunk, so every boundary but the last is kept; the single-state walks in parts of one chunk). Chunked power 2
    normalized only: unnormalized, it runs the same kernels (the normalizer is made either way)."""
    monkeypatch.setattr(hopper_backward, "CHECKPOINT", 1)
    monkeypatch.setattr(hopper, "MIN_PART_CHUNKS", 1)
    _check(rng, _kernel(family, "mosaic_gpu", power, normalize), 300, 64, power, normalize)


def test_decayed_attention_runs_the_kernels_for_16_bit_operands_and_falls_back_for_float32(rng, caplog):
    q, k, v, a = _inputs(rng, 150, 16, 2, "softmax")
    ids = segment_ids(STARTS[150], 150)
    options = dict(power=2, normalize="softmax", scale=SCALE, segment_ids=ids)
    y = ops.decayed_attention(q, k, v, a, impl="pallas_parallel", **options)
    kernel = _kernel("parallel", "triton", 2, "softmax")(q, k, v, a, ids)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(kernel, np.float32))
    assert "segment_ids" not in caplog.text
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    y32 = ops.decayed_attention(q32, k32, v32, a, impl="pallas_parallel", **options)
    assert "segment_ids with float32 operands" in caplog.text
    assert rel_error(y32, ops.decayed_attention(q32, k32, v32, a, impl="chunked", **options)) < 1e-6
    y_chunked = ops.decayed_attention(q, k, v, a, impl="pallas_chunked", chunk_size=16, **options)
    np.testing.assert_array_equal(np.asarray(y_chunked, np.float32),
                                  np.asarray(_kernel("chunked", "triton", 2, "softmax")(q, k, v, a, ids), np.float32))
    assert caplog.text.count("segment_ids") == 1  # only the float32 request fell back
