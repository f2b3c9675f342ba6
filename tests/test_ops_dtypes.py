"""bfloat16 and float32 inputs through the chunked paths, against the float64 oracle.

float32 accumulates with ~1e-7 unit rounding over tens of terms: 1e-5 relative. bfloat16 inputs are rounded to
8 mantissa bits before any arithmetic (~4e-3 per element), so outputs and gradients land within 1e-2 relative
of the oracle run on the same rounded inputs.
"""

import jax
import jax.numpy as jnp
import pytest
from helpers import random_qkv, rel_error

from twomamba_jax import ops

TOLERANCES = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", ["chunked", "associative"])
@pytest.mark.parametrize("power,normalize", [(1, None), (2, "softmax"), (2, None)])
def test_low_precision_matches_float64_oracle(rng, dtype, impl, power, normalize):
    q, k, v, log_decay = random_qkv(rng, length=45, key_dim=16, value_dim=16, dtype=dtype)
    log_decay = log_decay.astype(jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal(v.shape))
    kw = dict(power=power, normalize=normalize)

    def loss(impl, *args):
        y = ops.decayed_attention(*args, impl=impl, chunk_size=16, **kw)
        return jnp.sum(y.astype(jnp.float64) * cotangent), y

    args = (q, k, v, log_decay)
    oracle_args = tuple(x.astype(jnp.float64) for x in args)
    (_, y_ref), g_ref = jax.value_and_grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2, 3), has_aux=True)(
        *oracle_args)
    (_, y), g = jax.value_and_grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2, 3), has_aux=True)(*args)
    assert y.dtype == dtype
    tol = TOLERANCES[dtype]
    assert rel_error(y, y_ref) < tol
    for name, got, expected in zip(("q", "k", "v", "log_decay"), g, g_ref):
        assert got.dtype == args[("q", "k", "v", "log_decay").index(name)].dtype
        assert rel_error(got, expected) < tol, name
