"""Prefilling a KV cache (softmax, 2Mamba-E) with a long prompt attends in blocks of query rows: the numbers of
one dense pass, without its (T, capacity) score tensor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import largest_intermediate

from twomamba_jax import nn, ops
from twomamba_jax.ops import state as cache_state


def _exp_inputs(rng, batch, length, heads):
    q, k, v = (jnp.asarray(rng.standard_normal((batch, length, heads, 8))) for _ in range(3))
    log_decay = jnp.asarray(-np.log1p(np.exp(rng.standard_normal((batch, length, heads)))))
    return q, k, v, log_decay


@pytest.mark.parametrize("normalize", ["softmax", None])
def test_exp_prefill_in_blocks_equals_one_pass(rng, monkeypatch, normalize):
    q, k, v, a = _exp_inputs(rng, 2, 37, 3)
    kw = dict(power="exp", normalize=normalize, impl="reference")
    dense = ops.decayed_attention(q, k, v, a, **kw)  # no cache: the (N, N) oracle
    first, second = (x[:, :20] for x in (q, k, v, a)), (x[:, 20:] for x in (q, k, v, a))
    y_one, cache_one = ops.decayed_attention(*first, return_state=True, max_len=40, **kw)
    y_two, cache_two = ops.decayed_attention(*second, initial_state=cache_one, return_state=True, **kw)

    monkeypatch.setattr(cache_state, "SCORE_BUDGET", 5 * 40 * 6)  # 5 query rows a block against 40 slots
    first, second = (x[:, :20] for x in (q, k, v, a)), (x[:, 20:] for x in (q, k, v, a))
    y_one_b, cache_one_b = ops.decayed_attention(*first, return_state=True, max_len=40, **kw)
    y_two_b, cache_two_b = ops.decayed_attention(*second, initial_state=cache_one_b, return_state=True, **kw)

    np.testing.assert_allclose(jnp.concatenate([y_one, y_two], 1), dense, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jnp.concatenate([y_one_b, y_two_b], 1), dense, rtol=1e-10, atol=1e-12)
    for blocked, whole in zip(jax.tree.leaves(cache_two_b), jax.tree.leaves(cache_two)):
        np.testing.assert_array_equal(blocked, whole)


def test_exp_prefill_never_holds_the_whole_score_tensor(monkeypatch):
    length, capacity, heads = 512, 600, 2
    monkeypatch.setattr(cache_state, "SCORE_BUDGET", 64 * (capacity + length) * heads)
    spec = jax.ShapeDtypeStruct((1, length, heads, 8), jnp.float32)
    decay = jax.ShapeDtypeStruct((1, length, heads), jnp.float32)
    prefill = lambda q, k, v, a: ops.decayed_attention(q, k, v, a, power="exp", normalize="softmax", impl="reference",
                                                       return_state=True, max_len=capacity)
    largest = largest_intermediate(jax.make_jaxpr(prefill)(spec, spec, spec, decay).jaxpr)
    assert largest <= 64 * (capacity + length) * heads < length * capacity * heads


def test_softmax_prefill_in_blocks_equals_forward(rng, monkeypatch):
    layer = nn.SoftmaxAttention(32, 4, 8, nn.AttentionConfig(num_kv_heads=2), dtype=jnp.float64,
                                param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((2, 29, 32)))
    expected = layer(x)
    monkeypatch.setattr(cache_state, "SCORE_BUDGET", 6 * 32 * 8)  # 6 query rows a block
    y, cache = layer.step(x, layer.init_cache(2, max_len=32))
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    step = jax.jit(layer.step)
    largest = largest_intermediate(jax.make_jaxpr(step)(x, layer.init_cache(2, max_len=32)).jaxpr)
    assert largest < 29 * 32 * 8
    assert int(cache.length) == 29
