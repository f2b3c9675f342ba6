"""Linen code can use the mixers through the adapters, with the same numbers as the NNX modules."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as flax_linen
from flax import nnx

from twomamba_jax import nn, presets
from twomamba_jax.nn import linen


def test_linen_adapter_matches_nnx_module(rng):
    config = presets.mixer_config("2mamba")
    layer = linen.decayed_attention_linen(32, 2, 16, config)
    x = jnp.asarray(rng.standard_normal((2, 9, 32)), jnp.float32)
    variables = layer.init(jax.random.key(0), x)
    y = layer.apply(variables, x)

    module = nn.DecayedAttention(32, 2, 16, config, rngs=nnx.Rngs(1))
    nnx.update(module, nnx.State(flax_linen.meta.unbox(variables)["params"]))
    np.testing.assert_allclose(y, module(x), rtol=1e-6, atol=1e-6)

    # The logical axis names survive the bridge, for Linen's own sharding rules.
    specs = flax_linen.get_partition_spec(variables)["params"]
    assert specs["qkv"] == jax.sharding.PartitionSpec("embed", None, "heads", "head_dim")

    grads = jax.grad(lambda v: jnp.sum(layer.apply(v, x) ** 2))(variables)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))

    # Document masks pass through the bridge: two documents per row, as the NNX module gives them.
    segment_ids = jnp.asarray([[1] * 4 + [2] * 5] * 2)
    np.testing.assert_allclose(layer.apply(variables, x, segment_ids=segment_ids),
                               module(x, segment_ids=segment_ids), rtol=1e-6, atol=1e-6)


def test_other_adapters_build(rng):
    x = jnp.asarray(rng.standard_normal((1, 5, 32)), jnp.float32)
    for layer in (linen.softmax_attention_linen(32, 2, 16), linen.mamba2_linen(32, nn.Mamba2Config(head_dim=16))):
        variables = layer.init(jax.random.key(0), x)
        assert layer.apply(variables, x).shape == x.shape
        assert layer.apply(variables, x, segment_ids=jnp.asarray([[1, 1, 2, 2, 2]])).shape == x.shape
