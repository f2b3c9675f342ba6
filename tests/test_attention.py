"""Softmax attention: RoPE is relative, GQA decodes like its forward pass, the mask is causal."""

import jax.numpy as jnp
import numpy as np
from flax import nnx
from helpers import prefill_then_step

from twomamba_jax import nn


def test_rope_scores_depend_only_on_relative_position(rng):
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)))
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)))

    def score(i, j):
        qi = nn.apply_rope(q, jnp.asarray([i]), 10000.0)
        kj = nn.apply_rope(k, jnp.asarray([j]), 10000.0)
        return float(jnp.sum(qi * kj))

    assert abs(score(5, 2) - score(105, 102)) < 1e-9
    assert abs(score(5, 2) - score(5, 3)) > 1e-6
    np.testing.assert_allclose(score(0, 0), float(jnp.sum(q * k)), rtol=1e-12)


def test_grouped_query_attention_decode_equals_forward(rng):
    layer = nn.SoftmaxAttention(32, 4, 8, nn.AttentionConfig(num_kv_heads=2), dtype=jnp.float64,
                                param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    assert layer.k_proj.shape == (32, 2, 8)
    x = jnp.asarray(rng.standard_normal((2, 10, 32)))
    y = layer(x)
    # jax.nn.dot_product_attention takes its softmax in float32, hence 1e-6.
    np.testing.assert_allclose(prefill_then_step(layer, x, prefill=4, max_len=12), y, rtol=1e-6, atol=1e-6)
    y_changed = layer(x.at[:, 6].add(1.0))
    np.testing.assert_allclose(y_changed[:, :6], y[:, :6], rtol=0, atol=1e-12)
