"""Grouped keys and values (fewer k/v heads than q heads) through every implementation, values and gradients,
against the float64 dense oracle on keys and values repeated to one per query head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_error, tree_rel_error

from twomamba_jax import ops

TOL = 1e-10  # float64: every path computes the same sums in another order


def _grouped_inputs(rng, heads=4, kv_heads=2, length=21, dk=8, dv=5):
    q = jnp.asarray(np.abs(rng.standard_normal((2, length, heads, dk))))
    k = jnp.asarray(np.abs(rng.standard_normal((2, length, kv_heads, dk))))
    v = jnp.asarray(rng.standard_normal((2, length, kv_heads, dv)))
    log_decay = jnp.asarray(-rng.uniform(0.0, 0.5, (2, length, heads)))
    return q, k, v, log_decay


CASES = [(impl, power, normalize) for impl in ("reference", "chunked", "associative")
         for power, normalize in ((1, "softmax"), (2, "softmax"), (2, None))] + [("reference", "exp", "softmax")]


@pytest.mark.parametrize("impl,power,normalize", CASES)
def test_grouped_keys_equal_repeated_keys(rng, impl, power, normalize):
    q, k, v, log_decay = _grouped_inputs(rng)
    group = q.shape[2] // k.shape[2]

    def loss(fn_impl, q, k, v, log_decay, repeat):
        if repeat:
            k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        y = ops.decayed_attention(q, k, v, log_decay, power=power, normalize=normalize, impl=fn_impl, chunk_size=8)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y

    grad = jax.value_and_grad(loss, argnums=(1, 2, 3, 4), has_aux=True)
    (_, y), grads = grad(impl, q, k, v, log_decay, False)
    (_, y_ref), grads_ref = grad("reference", q, k, v, log_decay, True)
    assert y.shape == (*q.shape[:3], v.shape[-1])
    assert rel_error(y, y_ref) < TOL
    assert tree_rel_error(grads, grads_ref) < TOL


def test_grouped_decode_step_and_state(rng):
    q, k, v, log_decay = _grouped_inputs(rng)
    kw = dict(power=2, normalize="softmax")
    y_ref, state = ops.decayed_attention(q[:, :-1], k[:, :-1], v[:, :-1], log_decay[:, :-1], impl="chunked",
                                         return_state=True, **kw)
    y_last, _ = ops.decayed_attention_step(q[:, -1], k[:, -1], v[:, -1], log_decay[:, -1], state, **kw)
    y_full = ops.decayed_attention(q, k, v, log_decay, impl="reference", **kw)
    assert rel_error(y_last, y_full[:, -1]) < TOL


def test_group_must_divide_heads(rng):
    q, k, v, log_decay = _grouped_inputs(rng, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="k: expected the shape of q .* head count dividing 4"):
        ops.decayed_attention(q, k, v, log_decay, power=2, normalize="softmax")
    q, k, v, log_decay = _grouped_inputs(rng)
    with pytest.raises(ValueError, match="v: expected leading dims"):
        ops.decayed_attention(q, k, v[:, :, :1], log_decay, power=2, normalize="softmax")
