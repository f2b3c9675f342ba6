"""The chunked paths stay O(N) in memory: no N x N matrix and no per-token state, forward or backward.

Checked structurally on the jaxpr (every intermediate array, including inside scans and the VJP), so the test is
exact and fast: with N = 1024, d = 16 (F = 136 features) an N x N score matrix has 1M elements and per-token states
have N * F * dv = 2.2M, while the largest legitimate intermediates (per-chunk states, phi of all keys) stay < 200k.
"""

import jax
import jax.numpy as jnp
import pytest
from helpers import largest_intermediate

from twomamba_jax import ops

N, D = 1024, 16
LIMIT = N * N // 4


@pytest.mark.parametrize("impl", ["chunked", "associative"])
@pytest.mark.parametrize("power", [1, 2])
def test_no_quadratic_or_per_token_state_intermediates(impl, power):
    shape = jax.ShapeDtypeStruct((1, N, 1, D), jnp.float32)
    decay = jax.ShapeDtypeStruct((1, N, 1), jnp.float32)

    def loss(q, k, v, a):
        y = ops.decayed_attention(q, k, v, a, power=power, normalize="softmax", impl=impl, chunk_size=64)
        return jnp.sum(y)

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(shape, shape, shape, decay)
    assert largest_intermediate(jaxpr.jaxpr) < LIMIT


def test_the_check_sees_the_dense_form():
    """The same check flags the dense reference, so it can fail."""
    shape = jax.ShapeDtypeStruct((1, N, 1, D), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda q, k, v: ops.decayed_attention(q, k, v, power=2, normalize=None,
                                                                  impl="reference"))(shape, shape, shape)
    assert largest_intermediate(jaxpr.jaxpr) >= N * N
