"""The language model: forward, backward, decoding, parameter counts, initialization and sharding names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import prefill_then_step

from twomamba_jax import nn, presets


def _count(config) -> int:
    abstract = nnx.eval_shape(lambda: nn.LanguageModel(config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("size,expected", [("small", 276e6), ("medium", 735e6)])
def test_parameter_counts_match_the_paper(size, expected):
    counts = {mixer: _count(presets.model_config(size, mixer=mixer)) for mixer in
              ("2mamba", "2mamba-dt", "mamba2s", "softmax", "linear")}
    print(f"\n{size}: " + ", ".join(f"{m} {c / 1e6:.1f}M" for m, c in counts.items()))
    for mixer, count in counts.items():
        assert abs(count - expected) / expected < 0.01, (mixer, count)


@pytest.mark.parametrize("mixer", ["2mamba", "softmax", "mamba2"])
def test_forward_backward_and_decode(rng, mixer):
    config = presets.model_config("tiny", mixer=mixer, vocab_size=50)
    model = nn.LanguageModel(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(rng.integers(0, 50, (2, 12)))
    logits = model(tokens)
    assert logits.shape == (2, 12, 50) and logits.dtype == jnp.float32

    def loss(model):
        logp = jax.nn.log_softmax(model(tokens[:, :-1]))
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    value, grads = nnx.value_and_grad(loss)(model)
    assert abs(float(value) - np.log(50)) < 1.0  # near chance at initialization
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))

    decoded = prefill_then_step(model, tokens, prefill=5, max_len=12)
    np.testing.assert_allclose(decoded, logits, rtol=1e-5, atol=1e-5)  # float32 paths


def test_every_parameter_has_logical_axis_names():
    for mixer in ("2mamba", "softmax", "mamba2", "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__"
                                                  "dt_on_values__Z_out_gate"):
        model = nn.LanguageModel(presets.model_config("tiny", mixer=mixer, vocab_size=16), rngs=nnx.Rngs(0))
        params = nnx.state(model, nnx.Param)
        is_param = lambda x: isinstance(x, nnx.Variable)
        specs = jax.tree.leaves(nnx.get_partition_spec(params), is_leaf=is_param)
        for (path, param), spec in zip(jax.tree.leaves_with_path(params, is_leaf=is_param), specs, strict=True):
            names = param.get_metadata().get("out_sharding")
            assert names is not None and len(names) == param.ndim, path
            assert spec.get_value() == jax.sharding.PartitionSpec(*names), path


@pytest.mark.parametrize("init", ["torch", "normal"])
def test_initialization_schemes(init):
    model = nn.LanguageModel(presets.model_config("tiny", init=init, vocab_size=16), rngs=nnx.Rngs(0))
    mixer = model.blocks[0].mixer
    qkv = np.asarray(mixer.qkv[...])
    embed = np.asarray(model.embed[...])
    assert abs(embed.std() - 0.02) < 0.004
    if init == "torch":
        bound = 1 / np.sqrt(128)
        assert np.abs(qkv).max() <= bound and abs(qkv.std() - bound / np.sqrt(3)) < 0.1 * bound
    else:
        assert abs(qkv.std() - 0.02) < 0.002
    conv = np.asarray(mixer.conv.kernel[...])
    assert np.abs(conv).max() <= 1 / np.sqrt(2)


@pytest.mark.parametrize("mixer", ["2mamba", "softmax", "mamba2"])
def test_bf16_compute_with_float32_parameters(rng, mixer):
    config = presets.model_config("tiny", mixer=mixer, vocab_size=32, dtype=jnp.bfloat16)
    model = nn.LanguageModel(config, rngs=nnx.Rngs(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    tokens = jnp.asarray(rng.integers(0, 32, (2, 70)))
    logits = model(tokens)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    grads = nnx.grad(lambda m: jnp.mean(jax.nn.log_softmax(m(tokens)) ** 2))(model)
    assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_expected_partition_names():
    model = nn.LanguageModel(presets.model_config("tiny", vocab_size=16), rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    P = jax.sharding.PartitionSpec
    block = specs["blocks"][0]
    assert specs["embed"].get_value() == P("vocab", "embed")
    assert specs["lm_head"].get_value() == P("embed", "vocab")
    assert block["mixer"]["qkv"].get_value() == P("embed", None, "heads", "head_dim")
    assert block["mixer"]["out"].get_value() == P("heads", "head_dim", "embed")
    assert block["mixer"]["conv"]["kernel"].get_value() == P("conv", None, "heads", "head_dim")
    assert block["mlp"]["gate"].get_value() == P("embed", "mlp")
    assert block["mlp"]["down"].get_value() == P("mlp", "embed")


def test_bad_inputs():
    with pytest.raises(ValueError, match="mixer: expected a MixerConfig"):
        nn.ModelConfig(vocab_size=8, model_dim=8, num_layers=1, num_heads=1, head_dim=8, mlp_dim=8, mixer="2mamba")
    with pytest.raises(ValueError, match="num_layers: expected a positive integer"):
        presets.model_config("tiny", num_layers=0)
    with pytest.raises(ValueError, match="init: expected one of"):
        presets.model_config("tiny", init="xavier")
    model = nn.LanguageModel(presets.model_config("tiny", vocab_size=16), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"tokens: expected an integer array of shape \(B, N\)"):
        model(jnp.zeros((2, 3, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"tokens: expected ids in \[0, 16\)"):
        model(jnp.full((1, 3), 16))
    with pytest.raises(ValueError, match="overrides:"):
        presets.mixer_config("2mamba", powr=2)
    with pytest.raises(ValueError, match="norm: power='exp' needs norm='softmax'"):
        nn.MixerConfig(power="exp", norm="output")
    with pytest.raises(ValueError, match="num_kv_heads: expected a divisor of num_heads=4"):
        nn.SoftmaxAttention(128, 4, 32, nn.AttentionConfig(num_kv_heads=3), rngs=nnx.Rngs(0))
