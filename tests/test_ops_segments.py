"""Document masking (``segment_ids``): packed rows give, document by document, what each document gives alone,
values and gradients of q, k, v and the log-decay, for every variant and every jnp form (dense, chunked, and
associative: chunks that hold one, several or no document starts, documents of one token), in float64 (1e-10);
the state goes in to the first document only and comes out of the last only. The Pallas kernels take segment ids
for 16-bit operands (``tests/test_kernels_segments.py``); float32 requests fall back with one log line."""

import functools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import each_document_alone, rel_error, segment_ids

from twomamba_jax import ops

VARIANTS = [(1, None), (1, "softmax"), (2, None), (2, "softmax"), ("exp", None), ("exp", "softmax")]
# Row 0: documents of 5, 1, 1, 13, 20 tokens; row 1: one document.
STARTS = [(0, 5, 6, 7, 20), (0,)]
LENGTH, TOLERANCE = 40, 1e-10


def _segment_ids():
    return segment_ids(STARTS, LENGTH) * 7 + 3  # any integers: only changes matter


def _inputs(rng, power, normalize, decay):
    shape = (len(STARTS), LENGTH, 2, 8)
    q, k, v = (rng.standard_normal(shape) for _ in range(3))
    if power == 1 and normalize:
        q, k = np.abs(q), np.abs(k)
    a = -np.log1p(np.exp(rng.standard_normal(shape[:3]))) if decay else None
    return tuple(None if x is None else jnp.asarray(x) for x in (q, k, v, a))


def _per_document(q, k, v, a, **options):
    """Each document of each row alone, by the dense form, put back in place."""
    return each_document_alone(functools.partial(ops.decayed_attention, impl="reference", **options),
                               (q, k, v, a), STARTS)


# exp has only the dense form here (and the flash-style kernels).
CASES = [(impl, power, normalize) for impl in ("reference", "chunked", "associative") for power, normalize in VARIANTS
         if power != "exp" or impl == "reference"]


@pytest.mark.parametrize("impl,power,normalize", CASES)
@pytest.mark.parametrize("decay", [True, False])
def test_packed_documents_equal_documents_alone(rng, impl, power, normalize, decay):
    q, k, v, a = _inputs(rng, power, normalize, decay)
    cotangent = jnp.asarray(rng.standard_normal(q.shape))
    options = dict(power=power, normalize=normalize)

    def loss(attention, *args):
        return jnp.sum(attention(*args) * cotangent)

    packed = lambda q, k, v, a: ops.decayed_attention(q, k, v, a, impl=impl, chunk_size=8,
                                                      segment_ids=_segment_ids(), **options)
    alone = functools.partial(_per_document, **options)
    argnums = (0, 1, 2, 3) if decay else (0, 1, 2)
    got = jax.value_and_grad(functools.partial(loss, packed), argnums)(q, k, v, a)
    expected = jax.value_and_grad(functools.partial(loss, alone), argnums)(q, k, v, a)
    assert rel_error(packed(q, k, v, a), alone(q, k, v, a)) < TOLERANCE
    for name, g, e in zip("qkva", got[1], expected[1]):
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert rel_error(g, e) < TOLERANCE, name


@pytest.mark.parametrize("impl", ["reference", "chunked", "associative"])
def test_the_state_reaches_the_first_document_and_leaves_from_the_last(rng, impl):
    q, k, v, a = _inputs(rng, 2, "softmax", True)
    options = dict(power=2, normalize="softmax")
    state_in = ops.decayed_attention(*(jnp.asarray(rng.standard_normal(q.shape)) for _ in range(3)), a,
                                     impl="reference", return_state=True, **options)[1]
    y, state_out = ops.decayed_attention(q, k, v, a, impl=impl, chunk_size=8, segment_ids=_segment_ids(),
                                         initial_state=state_in, return_state=True, **options)
    first = slice(0, STARTS[0][1])
    y_first = ops.decayed_attention(q[:1, first], k[:1, first], v[:1, first], a[:1, first], impl="reference",
                                    initial_state=jax.tree.map(lambda s: s[:1], state_in), **options)
    assert rel_error(y[:1, first], y_first) < TOLERANCE
    last = slice(STARTS[0][-1], LENGTH)
    _, state_last = ops.decayed_attention(q[:1, last], k[:1, last], v[:1, last], a[:1, last], impl="reference",
                                          return_state=True, **options)
    for got, expected in zip(jax.tree.leaves(state_out), jax.tree.leaves(state_last)):
        assert rel_error(got[:1], expected) < TOLERANCE
    # Row 1 is one document: the state goes through it as without segment ids.
    _, state_whole = ops.decayed_attention(q[1:], k[1:], v[1:], a[1:], impl="reference", return_state=True,
                                           initial_state=jax.tree.map(lambda s: s[1:], state_in), **options)
    for got, expected in zip(jax.tree.leaves(state_out), jax.tree.leaves(state_whole)):
        assert rel_error(got[1:], expected) < TOLERANCE


def test_kernels_fall_back_and_bad_segment_ids_are_refused(rng, caplog):
    q, k, v, a = _inputs(rng, 2, "softmax", True)
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    options = dict(power=2, normalize="softmax", segment_ids=_segment_ids())
    with caplog.at_level(logging.WARNING):
        y = ops.decayed_attention(q, k, v, a, impl="pallas", **options)
    assert "segment_ids with float32 operands (the kernels mask documents for 16-bit ones); using impl='chunked'" \
        in caplog.text
    assert rel_error(y, ops.decayed_attention(q, k, v, a, impl="chunked", **options)) < 1e-6
    for bad, what in ((_segment_ids()[:, :-1], "shape (2, 39)"), (_segment_ids().astype(jnp.float32), "float32")):
        with pytest.raises(ValueError, match=r"segment_ids: expected a \(B, N\) = \(2, 40\) integer array.*"
                           + re.escape(what)):
            ops.decayed_attention(q, k, v, a, power=2, normalize=None, segment_ids=bad)


@pytest.mark.parametrize("preset", ["2mamba", "2mamba-e", "mamba2s", "linear"])
def test_mixer_on_packed_documents_equals_the_mixer_on_each(rng, preset):
    """The mixer module (conv over the fused q/k/v of width 2, decays or none, every norm) with ``segment_ids``:
    each document's outputs and parameter gradients as when it runs alone (float64; 1e-6 where the output
    RMSNorm, which computes in float32, is in the path)."""
    from flax import nnx

    from twomamba_jax import nn, presets

    config = presets.mixer_config(preset, chunk_size=8, impl="reference" if preset == "2mamba-e" else "chunked")
    mixer = nn.DecayedAttention(16, 2, 8, config, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((len(STARTS), LENGTH, 16)))
    cotangent = jnp.asarray(rng.standard_normal(x.shape))

    alone = lambda mixer, x: each_document_alone(mixer, (x,), STARTS)

    packed = lambda mixer, x: mixer(x, segment_ids=_segment_ids())
    loss = lambda fn: lambda mixer, x: jnp.sum(fn(mixer, x) * cotangent)
    tol = 1e-6 if config.norm == "output" else TOLERANCE
    got = nnx.jit(nnx.grad(loss(packed), argnums=(0, 1)))(mixer, x)
    expected = nnx.jit(nnx.grad(loss(alone), argnums=(0, 1)))(mixer, x)
    assert rel_error(nnx.jit(packed)(mixer, x), nnx.jit(alone)(mixer, x)) < tol
    assert rel_error(got[1], expected[1]) < tol
    for (path, g), (_, e) in zip(nnx.to_flat_state(nnx.state(got[0])), nnx.to_flat_state(nnx.state(expected[0]))):
        assert rel_error(g[...], e[...]) < tol, path
