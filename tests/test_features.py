import jax.numpy as jnp
import numpy as np
import pytest

from twomamba_jax.ops import feature_map, feature_size


@pytest.mark.parametrize("dim", [1, 2, 7, 64])
def test_second_order_features_reproduce_squared_dot_product(rng, dim):
    q = jnp.asarray(rng.standard_normal((5, dim)))
    k = jnp.asarray(rng.standard_normal((5, dim)))
    phi_q, phi_k = feature_map(q, 2), feature_map(k, 2)
    assert phi_q.shape == (5, dim * (dim + 1) // 2) == (5, feature_size(dim, 2))
    np.testing.assert_allclose(np.sum(phi_q * phi_k, -1), np.sum(q * k, -1) ** 2, rtol=1e-12)


def test_first_order_features_are_the_identity(rng):
    u = jnp.asarray(rng.standard_normal((3, 4, 16)))
    assert feature_map(u, 1) is u
    assert feature_size(16, 1) == 16
