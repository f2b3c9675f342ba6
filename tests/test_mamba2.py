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


def _silu(x):
    return x / (1 + np.exp(-x))


def _mamba2_block(block, x):
    """The official Mamba-2 forward in float64 NumPy, reading the module's parameters."""
    cfg = block.config
    param = lambda p: np.asarray(p[...], np.float64)
    heads, p, groups, n = block.num_heads, cfg.head_dim, cfg.num_groups, cfg.d_state
    batch, length, _ = x.shape
    proj = x @ param(block.in_proj)
    d_mlp, d_ssm = block.d_mlp, block.d_ssm
    z0, x0, z, xbc, dt = np.split(proj, np.cumsum([d_mlp, d_mlp, d_ssm, d_ssm + 2 * groups * n]), axis=-1)
    kernel = param(block.conv.kernel)
    conv = param(block.conv.bias) + np.zeros_like(xbc)
    for s in range(cfg.conv_window):
        conv[:, s:] += kernel[s] * xbc[:, :length - s]
    xbc = _silu(conv)
    xs, B, C = np.split(xbc, [d_ssm, d_ssm + groups * n], axis=-1)
    xs = xs.reshape(batch, length, heads, p)
    dt = np.log1p(np.exp(dt + param(block.dt_bias)))
    A = -np.exp(param(block.A_log))
    y = _ssd_recurrence(xs, dt, A, B.reshape(batch, length, groups, n), C.reshape(batch, length, groups, n))
    D = param(block.D)
    y = y + xs * (D if cfg.d_has_hdim else D[:, None])
    gated = (y * _silu(z.reshape(y.shape))).reshape(batch, length, groups, -1)
    gated = gated / np.sqrt(np.mean(gated**2, axis=-1, keepdims=True) + cfg.norm_eps)
    y = (gated.reshape(y.shape) * param(block.norm_scale)).reshape(batch, length, d_ssm)
    y = np.concatenate([_silu(z0) * x0, y], axis=-1)
    return y @ param(block.out_proj)


@pytest.mark.parametrize("d_has_hdim", [False, True])
def test_block_matches_the_official_forward(rng, d_has_hdim):
    """Split order, conv, dt, D, grouped gated RMSNorm and the gated-MLP branch, against NumPy in float64."""
    config = nn.Mamba2Config(expand=2, head_dim=8, d_state=4, num_groups=2, d_ssm=32, d_has_hdim=d_has_hdim,
                             chunk_size=8)
    block = nn.Mamba2(32, config, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    assert (block.num_heads, block.d_mlp) == (4, 32)
    x = rng.standard_normal((2, 19, 32))
    assert rel_error(block(jnp.asarray(x)), _mamba2_block(block, x)) < 1e-10
