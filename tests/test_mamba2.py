"""The Mamba-2 block: its SSD core against Mamba-2's own recurrence, written out independently, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import rel_error

from twomamba_jax import nn


def _ssd_recurrence(x, dt, A, B, C):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ; y_t = h_t C_t, per head, heads grouped onto B/C groups."""
    batch, length, heads, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    group_of = np.arange(heads) // (heads // groups)
    h = np.zeros((batch, heads, p, n))
    ys = np.zeros_like(x)
    for t in range(length):
        decay = np.exp(dt[:, t] * A)  # (B, H)
        b_t, c_t = B[:, t][:, group_of], C[:, t][:, group_of]  # (B, H, n)
        h = decay[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * b_t[:, :, None, :]
        ys[:, t] = np.einsum("bhpn,bhn->bhp", h, c_t)
    return ys


@pytest.mark.parametrize("impl", ["reference", "chunked", "associative"])
def test_ssd_core_is_mamba2_recurrence(rng, impl):
    batch, length, heads, p, groups, n = 2, 29, 4, 6, 2, 5
    x = rng.standard_normal((batch, length, heads, p))
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.5), (batch, length, heads)))
    A = -rng.uniform(1, 16, heads)
    B = rng.standard_normal((batch, length, groups, n))
    C = rng.standard_normal((batch, length, groups, n))
    y = nn.ssd(*(jnp.asarray(a) for a in (x, dt, A, B, C)), impl=impl, chunk_size=8)
    assert rel_error(y, _ssd_recurrence(x, dt, A, B, C)) < 1e-10


def test_initialization_follows_the_official_module():
    block = nn.Mamba2(64, nn.Mamba2Config(head_dim=16, d_state=8), rngs=nnx.Rngs(0))
    dt = jax.nn.softplus(block.dt_bias[...])
    assert block.num_heads == 8
    assert bool(jnp.all(dt >= 1e-3 - 1e-9)) and bool(jnp.all(dt <= 0.1 + 1e-9))
    A = jnp.exp(block.A_log[...])
    assert bool(jnp.all((A >= 1) & (A <= 16)))


def test_paper_preset_is_one_head_beside_a_gated_mlp():
    block = nn.Mamba2(128, nn.Mamba2Config(expand=1, d_ssm=64, conv_window=2, d_has_hdim=True), rngs=nnx.Rngs(0))
    assert (block.num_heads, block.d_mlp) == (1, 64)
    x = jnp.ones((1, 5, 128))
    assert block(x).shape == (1, 5, 128)


def test_bad_config():
    with pytest.raises(ValueError, match="d_ssm: expected a multiple of head_dim"):
        nn.Mamba2(64, nn.Mamba2Config(d_ssm=100), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_groups: expected a divisor"):
        nn.Mamba2(64, nn.Mamba2Config(head_dim=32, num_groups=3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x: expected shape \(B, N, 64\)"):
        nn.Mamba2(64, nn.Mamba2Config(head_dim=32), rngs=nnx.Rngs(0))(jnp.ones((1, 5, 32)))
