"""Every named mixer and every paper config: builds, is causal, decodes like its forward pass, trains in bf16."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import prefill_then_step

from twomamba_jax import nn, presets

MODEL_DIM, HEADS, HEAD_DIM = 32, 2, 16
SMALL_MAMBA = dict(head_dim=16, d_state=8)


def _mixer(name, dtype=jnp.float64, param_dtype=None, **overrides):
    config = presets.mixer_config(name, **overrides)
    if isinstance(config, nn.Mamba2Config):
        d_ssm = 16 if config.d_ssm else None
        config = dataclasses.replace(config, d_ssm=d_ssm, **SMALL_MAMBA)
    model = nn.ModelConfig(vocab_size=11, model_dim=MODEL_DIM, num_layers=1, num_heads=HEADS, head_dim=HEAD_DIM,
                           mlp_dim=64, mixer=config, dtype=dtype, param_dtype=param_dtype or dtype)
    return nn.make_mixer(model, nnx.Rngs(0))


def _impls(name):
    """Powers 1 and 2 are checked on both algorithms (chunk 4 makes several chunks); others have one path."""
    config = presets.mixer_config(name)
    if isinstance(config, nn.MixerConfig) and config.power != "exp":
        return [dict(impl="reference"), dict(impl="chunked", chunk_size=4), dict(impl="associative", chunk_size=4)]
    return [dict(impl="chunked", chunk_size=4)] if isinstance(config, nn.Mamba2Config) else [{}]


ALL = [(name, kw) for name in presets.MIXER_PRESETS for kw in _impls(name)]
# The paper's configs on the chunked path (several chunks), for causality and decoding of every flag.
ALL += [(name, dict(chunk_size=4)) for name in presets.PAPER_CONFIGS
        if isinstance(presets.PAPER_CONFIGS[name], nn.MixerConfig)]


def _x(rng, length=13, dtype=jnp.float64):
    return jnp.asarray(rng.standard_normal((2, length, MODEL_DIM)), dtype)


def test_paper_configs_are_the_28_of_the_paper():
    assert len(presets.PAPER_CONFIGS) == 28
    flags = presets.PAPER_CONFIGS["squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2"]
    assert flags == presets.MIXER_PRESETS["2mamba"]
    assert presets.PAPER_CONFIGS["exp__sm_norm__A_mask_type_neg_softplus__in_conv_k_2"] == presets.MIXER_PRESETS[
        "2mamba-e"]
    assert presets.PAPER_CONFIGS["linear__output_norm__A_mask_type_discretize"].decay == "original"


FLAG_PARAMS = {"conv_window": "conv", "d_residual": "D", "z_gate": "z_proj", "dt_on_values": "dt_proj",
               "norm": "out_norm"}


@pytest.mark.parametrize("name", sorted(presets.PAPER_CONFIGS))
def test_every_paper_config_runs_and_has_the_parameters_of_its_flags(rng, name):
    mixer = _mixer(name)
    y = mixer(_x(rng))
    assert y.shape == (2, 13, MODEL_DIM) and bool(jnp.all(jnp.isfinite(y)))
    config = presets.PAPER_CONFIGS[name]
    if isinstance(config, nn.MixerConfig):
        assert (mixer.conv is not None) == bool(config.conv_window)
        assert (mixer.D is not None) == config.d_residual
        assert (mixer.z_proj is not None) == config.z_gate
        assert (mixer.out_norm is not None) == (config.norm == "output")
        assert (mixer.dt_proj is not None) == (config.dt_on_values or config.decay == "original")
        assert (mixer.A_log is not None) == (config.decay == "original")
        assert (mixer.decay_proj is not None) == (config.decay == "softplus")


def test_paper_configs_compute_different_functions(rng):
    """Flags are not ignored: each distinct config gives a different output from the same input and seed."""
    x = _x(rng)
    outputs = {}
    for name, config in presets.PAPER_CONFIGS.items():
        if isinstance(config, nn.MixerConfig):
            outputs.setdefault(config, np.asarray(_mixer(name)(x)))
    values = list(outputs.values())
    assert len(values) >= 25
    for i in range(len(values)):
        for j in range(i):
            assert not np.allclose(values[i], values[j], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name,kw", ALL)
def test_causal(rng, name, kw):
    """Changing token t leaves every output before t untouched."""
    mixer = _mixer(name, **kw)
    x = _x(rng)
    t = 7
    y = mixer(x)
    y_changed = mixer(x.at[:, t].add(jnp.asarray(rng.standard_normal((2, MODEL_DIM)))))
    np.testing.assert_allclose(y_changed[:, :t], y[:, :t], rtol=0, atol=1e-12)
    assert not np.allclose(y_changed[:, t], y[:, t])


@pytest.mark.parametrize("name,kw", ALL)
def test_decode_equals_forward(rng, name, kw):
    """Prefill 6 tokens, then step the other 7 one at a time.

    float64 throughout, so 1e-10; softmax attention gets 1e-6 since jax.nn.dot_product_attention takes its
    softmax in float32.
    """
    mixer = _mixer(name, **kw)
    x = _x(rng)
    y = mixer(x)
    tol = 1e-6 if name == "softmax" else 1e-10
    np.testing.assert_allclose(prefill_then_step(mixer, x, prefill=6, max_len=16), y, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(presets.MIXER_PRESETS))
def test_bf16_outputs_and_gradients_are_finite(rng, name):
    """bfloat16 compute with float32 parameters, the training recipe."""
    mixer = _mixer(name, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    x = _x(rng, length=40, dtype=jnp.bfloat16)

    def loss(mixer, x):
        return jnp.mean(mixer(x).astype(jnp.float32) ** 2)

    value, grads = nnx.value_and_grad(loss)(mixer, x)
    assert mixer(x).dtype == jnp.bfloat16
    assert np.isfinite(float(value))
    leaves = jax.tree.leaves(grads)
    assert leaves and all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.max(jnp.abs(g.astype(jnp.float32)))) > 0 for g in leaves)


def test_unknown_preset():
    with pytest.raises(ValueError, match="name: expected a mixer preset"):
        presets.mixer_config("3mamba")
    with pytest.raises(ValueError, match="size: expected one of"):
        presets.model_config("huge")


def test_bad_mixer_flags():
    with pytest.raises(ValueError, match="qk_activation: power=1 with norm='softmax'"):
        nn.MixerConfig(power=1, norm="softmax")
    with pytest.raises(ValueError, match="norm: expected one of"):
        nn.MixerConfig(norm="layer")
    with pytest.raises(ValueError, match="decay: expected one of"):
        nn.MixerConfig(decay="exp")
    with pytest.raises(ValueError, match="power: expected one of"):
        nn.MixerConfig(power=3)
    with pytest.raises(ValueError, match="conv_window: expected a non-negative integer"):
        nn.MixerConfig(conv_window=-1)


OUTPUT_NORM = [name for name, config in {**presets.MIXER_PRESETS, **presets.PAPER_CONFIGS}.items()
               if isinstance(config, nn.MixerConfig) and config.norm == "output"]


def test_output_norm_configs_are_the_papers_output_norm_names():
    named = {name for name in presets.PAPER_CONFIGS if "output_norm" in name or "out_norm" in name}
    assert named == set(OUTPUT_NORM) - set(presets.MIXER_PRESETS) and len(named) == 21
    assert {"mamba2s", "linear-out"} <= set(OUTPUT_NORM)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", OUTPUT_NORM)
def test_output_norm_adds_the_machine_epsilon_of_the_compute_dtype(rng, name, dtype):
    """The paper's ``torch.nn.RMSNorm(H * d)`` has no eps: torch then adds finfo(dtype).eps. Inputs are scaled so
    that mean(x^2) is near that epsilon, where a different epsilon (e.g. 1e-5) would move the output by > 10%."""
    eps = float(jnp.finfo(dtype).eps)
    layer = _mixer(name, dtype=dtype, param_dtype=jnp.float32)
    layer.out_norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, (HEADS, HEAD_DIM)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((2, 5, HEADS, HEAD_DIM)) * np.sqrt(eps), dtype)

    x = np.asarray(y, np.float64)
    expected = x / np.sqrt(np.mean(x**2, axis=(-2, -1), keepdims=True) + eps) * np.asarray(layer.out_norm.scale[...])
    got = np.asarray(layer.out_norm(y), np.float64)
    tolerance = 1e-6 if dtype == jnp.float32 else 1e-2  # bf16: the output is rounded to 8 mantissa bits
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < tolerance
