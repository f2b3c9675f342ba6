"""reference == chunked == associative == token-by-token steps, values, states and gradients, in float64.

Every path computes the same sums in a different order, so in float64 they agree to rounding: 1e-10 relative
leaves five orders of magnitude of margin over the ~1e-15 seen, while any algebra slip shows up at >= 1e-3.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from helpers import random_qkv, rel_error, tree_rel_error

from twomamba_jax import ops

TOL = 1e-10
CASES = [(power, normalize, decay) for power in (1, 2) for normalize in ("softmax", None) for decay in (True, False)]


def _inputs(rng, power, normalize, decay, **kw):
    # Softmax normalization of power 1 needs non-negative weights (the mixer applies a ReLU).
    return random_qkv(rng, decay=decay, non_negative=(power == 1 and normalize == "softmax"), **kw)


def _random_state(rng, q, v, power, normalize):
    """A state from a random prefix, so it is a state the recurrence can actually reach."""
    prefix = _inputs(rng, power, normalize, True, batch=q.shape[0], length=9, heads=q.shape[2],
                     key_dim=q.shape[3], value_dim=v.shape[3])
    _, state = ops.decayed_attention(*prefix, power=power, normalize=normalize, impl="reference", return_state=True)
    return state


def _steps(q, k, v, log_decay, state, *, power, normalize):
    ys = []
    for t in range(q.shape[1]):
        y_t, state = ops.decayed_attention_step(
            q[:, t], k[:, t], v[:, t], None if log_decay is None else log_decay[:, t], state,
            power=power, normalize=normalize)
        ys.append(y_t)
    return jnp.stack(ys, axis=1), state


@pytest.mark.parametrize("power,normalize,decay", CASES)
@pytest.mark.parametrize("with_state", [False, True])
def test_all_paths_agree_with_the_dense_oracle(rng, power, normalize, decay, with_state):
    q, k, v, log_decay = _inputs(rng, power, normalize, decay)
    state0 = _random_state(rng, q, v, power, normalize) if with_state else None
    kw = dict(power=power, normalize=normalize, initial_state=state0, return_state=True)
    y_ref, s_ref = ops.decayed_attention(q, k, v, log_decay, impl="reference", **kw)

    for impl in ("chunked", "associative"):
        for chunk_size in (1, 5, 16, 64):  # 37 tokens: ragged last chunk, and a single partial chunk
            y, s = ops.decayed_attention(q, k, v, log_decay, impl=impl, chunk_size=chunk_size, **kw)
            assert rel_error(y, y_ref) < TOL, (impl, chunk_size)
            assert tree_rel_error(s, s_ref) < TOL, (impl, chunk_size)

    if state0 is None:
        state0 = ops.init_state(q.shape[0], q.shape[2], q.shape[3], v.shape[3], power=power, normalize=normalize,
                                dtype=q.dtype)
    y_steps, s_steps = _steps(q, k, v, log_decay, state0, power=power, normalize=normalize)
    assert rel_error(y_steps, y_ref) < TOL
    assert tree_rel_error(s_steps, s_ref) < TOL


@pytest.mark.parametrize("power,normalize,decay", CASES)
@pytest.mark.parametrize("impl", ["chunked", "associative"])
def test_gradients_agree_with_the_dense_oracle(rng, power, normalize, decay, impl):
    q, k, v, log_decay = _inputs(rng, power, normalize, decay, length=23)
    state0 = _random_state(rng, q, v, power, normalize)
    cotangent = jnp.asarray(rng.standard_normal(v.shape))
    state_cotangent = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape)), state0)

    def loss(impl, q, k, v, log_decay, state0):
        y, s = ops.decayed_attention(q, k, v, log_decay, power=power, normalize=normalize, impl=impl, chunk_size=5,
                                     initial_state=state0, return_state=True)
        state_term = sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(state_cotangent)))
        return jnp.sum(y * cotangent) + state_term

    argnums = (0, 1, 2, 3, 4) if decay else (0, 1, 2, 4)
    expected = jax.grad(functools.partial(loss, "reference"), argnums)(q, k, v, log_decay, state0)
    got = jax.grad(functools.partial(loss, impl), argnums)(q, k, v, log_decay, state0)
    for name, g, e in zip(("q", "k", "v", "log_decay", "state")[: len(argnums)], got, expected):
        assert tree_rel_error(g, e) < TOL, name


def _exp_oracle(q, k, v, log_decay, normalize):
    """exp attention written out directly: w_ij = exp(s_ij + sum_{j<t<=i} a_t), j <= i."""
    length = q.shape[1]
    a = jnp.zeros(q.shape[:3]) if log_decay is None else log_decay
    g = jnp.cumsum(a, axis=1)
    logits = jnp.einsum("bihd,bjhd->bhij", q, k) / jnp.sqrt(q.shape[-1])
    logits = logits + (g[:, :, None] - g[:, None, :]).transpose(0, 3, 1, 2)
    logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, -jnp.inf)
    weights = jax.nn.softmax(logits, -1) if normalize else jnp.exp(logits)
    return jnp.einsum("bhij,bjhe->bihe", weights, v)


@pytest.mark.parametrize("normalize", ["softmax", None])
def test_exp_values_and_gradients_match_the_direct_form(rng, normalize):
    q, k, v, log_decay = random_qkv(rng, length=19)
    cotangent = jnp.asarray(rng.standard_normal(v.shape))
    loss = lambda fn: lambda *x: jnp.sum(fn(*x) * cotangent)
    ours = lambda q, k, v, a: ops.decayed_attention(q, k, v, a, power="exp", normalize=normalize)
    direct = lambda q, k, v, a: _exp_oracle(q, k, v, a, normalize)
    assert rel_error(ours(q, k, v, log_decay), direct(q, k, v, log_decay)) < TOL
    got = jax.grad(loss(ours), (0, 1, 2, 3))(q, k, v, log_decay)
    expected = jax.grad(loss(direct), (0, 1, 2, 3))(q, k, v, log_decay)
    for name, g, e in zip("q k v log_decay".split(), got, expected):
        assert rel_error(g, e) < TOL, name


@pytest.mark.parametrize("normalize", ["softmax", None])
@pytest.mark.parametrize("decay", [True, False])
def test_exp_prefill_then_steps_equals_one_pass(rng, normalize, decay):
    q, k, v, log_decay = random_qkv(rng, decay=decay)
    kw = dict(power="exp", normalize=normalize)
    y_ref = ops.decayed_attention(q, k, v, log_decay, impl="reference", **kw)
    split = 20
    first = (q[:, :split], k[:, :split], v[:, :split], None if log_decay is None else log_decay[:, :split])
    # The prefill makes its own cache, with room for the tokens still to come.
    y_prefill, cache = ops.decayed_attention(*first, return_state=True, max_len=40, **kw)
    rest = (q[:, split:], k[:, split:], v[:, split:], None if log_decay is None else log_decay[:, split:])
    y_steps, cache = _steps(*rest, cache, **kw)
    assert int(cache.length) == q.shape[1]
    assert rel_error(jnp.concatenate([y_prefill, y_steps], axis=1), y_ref) < TOL


def test_exp_without_decay_is_causal_softmax_attention(rng):
    q, k, v, _ = random_qkv(rng, decay=False, key_dim=8, value_dim=8)
    y = ops.decayed_attention(q, k, v, power="exp", normalize="softmax")
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    assert rel_error(y, expected) < 1e-6  # jax.nn.dot_product_attention takes its softmax in float32


def test_returned_state_continues_the_sequence(rng):
    """Chunked prefill of one half, then the other half from its state == one pass over the whole."""
    q, k, v, log_decay = random_qkv(rng, length=50)
    kw = dict(power=2, normalize="softmax", impl="chunked", chunk_size=8)
    y_full = ops.decayed_attention(q, k, v, log_decay, **kw)
    y1, state = ops.decayed_attention(q[:, :21], k[:, :21], v[:, :21], log_decay[:, :21], return_state=True, **kw)
    y2 = ops.decayed_attention(q[:, 21:], k[:, 21:], v[:, 21:], log_decay[:, 21:], initial_state=state, **kw)
    assert rel_error(jnp.concatenate([y1, y2], axis=1), y_full) < TOL
