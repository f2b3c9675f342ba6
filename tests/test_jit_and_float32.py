"""The library under jax.jit and with float64 off (the default every user has): decoding, overflow, gradients."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from twomamba_jax import nn, ops, presets


def test_jitted_decode_matches_forward(rng):
    mixer = nn.DecayedAttention(32, 2, 16, presets.mixer_config("2mamba"), dtype=jnp.float64,
                                param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((2, 9, 32)))
    step = nnx.jit(lambda module, x_t, cache: module.step(x_t, cache))
    cache = mixer.init_cache(2, max_len=9)
    outs = []
    for t in range(9):
        y_t, cache = step(mixer, x[:, t:t + 1], cache)
        outs.append(y_t)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), mixer(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["softmax", "2mamba-e"])
def test_kv_cache_overflow_under_jit_poisons_instead_of_overwriting(rng, name):
    model_config = nn.ModelConfig(vocab_size=4, model_dim=32, num_layers=1, num_heads=2, head_dim=16, mlp_dim=8,
                                  mixer=presets.mixer_config(name), dtype=jnp.float64, param_dtype=jnp.float64)
    mixer = nn.make_mixer(model_config, nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((1, 3, 32)))
    step = nnx.jit(lambda module, x_t, cache: module.step(x_t, cache))
    cache = mixer.init_cache(1, max_len=2)
    y, cache = step(mixer, x[:, :2], cache)
    assert bool(jnp.all(jnp.isfinite(y)))
    y, _ = step(mixer, x[:, 2:], cache)  # no room: under jit the length is traced, so no ValueError
    assert bool(jnp.all(jnp.isnan(y)))
    with pytest.raises(ValueError, match="the cache holds 2 tokens and has 2"):
        mixer.step(x[:, 2:], cache)


def test_jit_of_gradients(rng):
    q, k, v = (jnp.asarray(rng.standard_normal((1, 40, 2, 8))) for _ in range(3))
    a = -jnp.asarray(rng.uniform(0, 0.3, (1, 40, 2)))
    loss = lambda impl: jax.jit(jax.grad(lambda q, k, v, a: jnp.sum(ops.decayed_attention(
        q, k, v, a, power=2, normalize="softmax", impl=impl, chunk_size=16) ** 2), (0, 1, 2, 3)))
    for got, expected in zip(loss("chunked")(q, k, v, a), loss("reference")(q, k, v, a)):
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from twomamba_jax import nn, ops, presets
    assert not jax.config.jax_enable_x64
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 70, 2, 16)), jnp.float32) for _ in range(3))
    a = jnp.asarray(-rng.uniform(0, 0.3, (2, 70, 2)), jnp.float32)
    for power in (1, 2):
        ref = ops.decayed_attention(q, k, v, a, power=power, normalize=None, impl="reference")
        for impl in ("chunked", "associative"):
            y = ops.decayed_attention(q, k, v, a, power=power, normalize=None, impl=impl, chunk_size=16)
            assert y.dtype == jnp.float32
            err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
            assert err < 1e-5, (power, impl, err)
    model = nn.LanguageModel(presets.model_config("tiny", vocab_size=32), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(rng.integers(0, 32, (2, 12)))
    logits = model(tokens)
    cache = model.init_cache(2, 12)
    decoded, cache = model.step(tokens[:, :7], cache)
    for t in range(7, 12):
        out, cache = model.step(tokens[:, t:t + 1], cache)
        decoded = jnp.concatenate([decoded, out], 1)
    assert float(jnp.max(jnp.abs(decoded - logits))) < 1e-4
    grads = nnx.grad(lambda m: jnp.mean(m(tokens) ** 2))(model)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    print("ok")
""")


def test_float32_default_configuration():
    """float32 (x64 off, as users run it): paths agree to 1e-5, the LM decodes and differentiates."""
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
