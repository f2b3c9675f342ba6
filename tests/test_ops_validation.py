"""Bad input gets a ValueError that names the argument and says what was expected."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv

from twomamba_jax import ops


@pytest.fixture
def qkv(rng):
    return random_qkv(rng, batch=1, length=6, heads=2, key_dim=4, value_dim=3)


def _call(q, k, v, log_decay=None, **kw):
    return ops.decayed_attention(q, k, v, log_decay, **{"power": 2, "normalize": "softmax", **kw})


def test_wrong_ranks(qkv):
    q, k, v, a = qkv
    with pytest.raises(ValueError, match=r"q: expected shape \(B, N, H, dk\)"):
        _call(q[0], k, v)
    with pytest.raises(ValueError, match=r"v: expected shape \(B, N, Hk, dv\)"):
        _call(q, k, v[..., 0])
    with pytest.raises(ValueError, match=r"log_decay: expected shape \(B, N, H\)"):
        _call(q, k, v, a[..., None])


def test_mismatched_shapes(qkv):
    q, k, v, a = qkv
    with pytest.raises(ValueError, match="k: expected the shape of q"):
        _call(q, k[..., :3], v)
    with pytest.raises(ValueError, match="v: expected leading dims"):
        _call(q, k, v[:, :5])
    with pytest.raises(ValueError, match=r"log_decay: expected shape \(B, N, H\) = \(1, 6, 2\)"):
        _call(q, k, v, a[:, :5])


def test_positive_log_decay(qkv):
    q, k, v, a = qkv
    with pytest.raises(ValueError, match="log_decay: expected finite values <= 0"):
        _call(q, k, v, a.at[0, 3, 1].set(0.1))


def test_unknown_power_normalize_impl(qkv):
    q, k, v, _ = qkv
    with pytest.raises(ValueError, match="power: expected one of"):
        _call(q, k, v, power=3)
    with pytest.raises(ValueError, match="power: expected one of"):
        _call(q, k, v, power=True)
    with pytest.raises(ValueError, match="normalize: expected 'softmax' or None"):
        _call(q, k, v, normalize="output")
    with pytest.raises(ValueError, match="impl: expected one of"):
        _call(q, k, v, impl="cuda")
    with pytest.raises(ValueError, match='impl: power="exp" has no finite state'):
        _call(q, k, v, power="exp", impl="chunked")
    with pytest.raises(ValueError, match="chunk_size: expected a positive integer"):
        _call(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="scale: expected a positive finite number"):
        _call(q, k, v, scale=-1.0)


def test_integer_inputs(qkv):
    q, k, v, _ = qkv
    with pytest.raises(ValueError, match="q: expected a floating-point array"):
        _call(q.astype(jnp.int32), k, v)


def test_bad_states(qkv):
    q, k, v, a = qkv
    good = ops.init_state(1, 2, 4, 3, power=2, normalize="softmax")
    with pytest.raises(ValueError, match="initial_state: power=2 expects a RecurrentState"):
        _call(q, k, v, initial_state=(good.numerator,))
    with pytest.raises(ValueError, match=r"initial_state.numerator: expected shape \(1, 2, 10, 3\)"):
        _call(q, k, v, initial_state=ops.init_state(1, 2, 4, 3, power=1, normalize="softmax"))
    with pytest.raises(ValueError, match="initial_state: normalize='softmax' expects a normalizer"):
        _call(q, k, v, initial_state=good._replace(normalizer=None))
    with pytest.raises(ValueError, match="state: power=2 expects a RecurrentState"):
        ops.decayed_attention_step(q[:, 0], k[:, 0], v[:, 0], a[:, 0], None, power=2, normalize=None)
    cache = ops.init_state(1, 2, 4, 3, power="exp", normalize="softmax", max_len=4)
    with pytest.raises(ValueError, match="initial_state: the cache holds 4 tokens"):
        _call(q, k, v, power="exp", initial_state=cache)
    with pytest.raises(ValueError, match='max_len: power="exp" keeps a KV cache'):
        ops.init_state(1, 2, 4, 3, power="exp", normalize=None)
    with pytest.raises(ValueError, match="num_heads: expected a positive integer"):
        ops.init_state(1, 0, 4, 3, power=1, normalize=None)


def test_step_shapes(qkv):
    q, k, v, a = qkv
    state = ops.init_state(1, 2, 4, 3, power=1, normalize=None)
    with pytest.raises(ValueError, match=r"q: expected shape \(B, H, dk\)"):
        ops.decayed_attention_step(q, k, v, a, state, power=1, normalize=None)


def test_more_bad_values(qkv):
    q, k, v, a = qkv
    with pytest.raises(ValueError, match="log_decay: expected finite values <= 0"):
        _call(q, k, v, a.at[0, 0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="log_decay: expected finite values <= 0"):
        _call(q, k, v, a.at[0, 0, 0].set(-jnp.inf))
    with pytest.raises(ValueError, match=r"q: expected at least one token \(N >= 1\)"):
        _call(q[:, :0], k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="scale: expected a positive finite number"):
        _call(q, k, v, scale=True)
    assert _call(q, k, v, scale=np.float32(0.5)).shape == v.shape
    with pytest.raises(ValueError, match='max_len: sizes the KV cache of power="exp"'):
        _call(q, k, v, max_len=10)
    with pytest.raises(ValueError, match='max_len: sizes the KV cache of power="exp"'):
        _call(q, k, v, power="exp", max_len=3)


@pytest.mark.parametrize("impl", ["reference", "chunked", "associative", "pallas"])
def test_empty_dimensions_are_refused_by_every_impl(qkv, impl):
    q, k, v, a = qkv
    with pytest.raises(ValueError, match=r"q: expected a batch of at least one row \(B >= 1\)"):
        _call(q[:0], k[:0], v[:0], a[:0], impl=impl)
    with pytest.raises(ValueError, match=r"q: expected a head dim >= 1"):
        _call(q[..., :0], k[..., :0], v, a, impl=impl)
    with pytest.raises(ValueError, match=r"v: expected a head dim >= 1"):
        _call(q, k, v[..., :0], a, impl=impl)
    with pytest.raises(ValueError, match=r"q: expected at least one head \(H >= 1\)"):
        _call(q[:, :, :0], k[:, :, :0], v[:, :, :0], a[:, :, :0], impl=impl)


def test_power_1_softmax_refuses_signed_inputs(qkv):
    q, k, v, a = qkv
    signed = q.at[0, 0, 0, 0].set(-1.0)
    with pytest.raises(ValueError, match="q: power=1 with normalize='softmax' needs entries >= 0"):
        _call(signed, jnp.abs(k), v, a, power=1)
    with pytest.raises(ValueError, match="k: power=1 with normalize='softmax' needs entries >= 0"):
        _call(jnp.abs(q), signed, v, a, power=1)
    assert _call(jnp.abs(q), jnp.abs(k), v, a, power=1).shape == v.shape
    assert _call(signed, k, v, a, power=1, normalize=None).shape == v.shape  # unnormalized: any sign
