"""Importing the paper's PyTorch checkpoints: the tensor mapping, the numerics against a numpy transcription of the
paper's forward pass (float64), and the twomamba-convert command.

The checkpoints are written here with the paper's names and shapes (random values), so torch is not needed."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from helpers import rel_error
from safetensors.numpy import save_file

from twomamba_jax import convert, nn, presets
from twomamba_jax.nn import AttentionConfig, Mamba2Config, MixerConfig

VOCAB, DIM, LAYERS, HEADS, MLP, D_STATE = 37, 32, 2, 2, 48, 8
HEAD_DIM = DIM // HEADS
F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
# Every optional tensor of the decayed layer at once; a 3-tap conv so the middle tap's place is checked too.
ALL_FLAGS = MixerConfig(power=1, norm="output", conv_window=3, decay="softplus", d_residual=True, z_gate=True,
                        dt_on_values=True, qk_activation="silu")


# ----------------------------------------------------------------------- checkpoints with the paper's names

def paper_state_dict(rng, mixer, *, layers=LAYERS) -> dict[str, np.ndarray]:
    """Random tensors named and shaped as the paper's LlamaForCausalLM (its LlamaDecoderLayer) saves them."""
    M, H, d = DIM, HEADS, HEAD_DIM

    def linear(out_dim, in_dim):
        return rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)

    def scale(*shape):
        return 1.0 + 0.1 * rng.standard_normal(shape)

    sd = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, M)), "model.norm.weight": scale(M),
          "lm_head.weight": linear(VOCAB, M)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": scale(M), p + "post_attention_layernorm.weight": scale(M),
               p + "mlp.gate_proj.weight": linear(MLP, M), p + "mlp.up_proj.weight": linear(MLP, M),
               p + "mlp.down_proj.weight": linear(M, MLP)}
        a = p + "self_attn."
        if isinstance(mixer, AttentionConfig):
            sd |= {a + "qkv_proj.weight": linear(3 * H * d, M), a + "o_proj.weight": linear(M, H * d),
                   a + "rotary_emb.freqs": 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)}
            continue
        if isinstance(mixer, Mamba2Config):  # the paper's Mamba2(expand=1, headdim=d, d_ssm=d, d_conv=2, ...)
            a += "mamba_layer."
            conv_dim = d + 2 * D_STATE
            sd |= {a + "in_proj.weight": linear(2 * (M - d) + d + conv_dim + 1, M),
                   a + "conv1d.weight": rng.standard_normal((conv_dim, 1, 2)) / np.sqrt(2),
                   a + "dt_bias": rng.uniform(-4.0, -1.0, 1), a + "A_log": np.log(rng.uniform(1.0, 16.0, 1)),
                   a + "D": scale(d), a + "norm.weight": scale(d), a + "out_proj.weight": linear(M, M)}
            continue
        w = mixer.conv_window
        sd |= {a + "qkv_proj.weight": linear(3 * H * d, M), a + "o_proj.weight": linear(M, H * d),
               a + "attn_mask": ~np.tril(np.ones((1, 1, 16, 16), bool))}
        if w:
            sd |= {a + "conv1d.weight": rng.standard_normal((3 * H * d, 1, w)) / np.sqrt(w),
                   a + "conv1d.bias": 0.1 * rng.standard_normal(3 * H * d)}
        if mixer.needs_dt:
            sd[a + "dt_proj.weight"] = linear(H, M)
        if mixer.decay == "original":
            sd[a + "A_log"] = np.log(rng.uniform(1.0, 16.0, H))
        if mixer.decay == "softplus":
            sd[a + "A_mask_proj.weight"] = linear(H, M)
        if mixer.d_residual:
            sd[a + "D"] = scale(H, d)
        if mixer.z_gate:
            sd |= {a + "z_gate_proj.weight": linear(H * d, M), a + "z_gate_proj.bias": 0.1 * rng.standard_normal(H * d)}
        if mixer.norm == "output":
            sd[a + "out_norm.weight"] = scale(H * d)
    return sd


def write(path, state_dict):
    save_file({name: np.ascontiguousarray(value) for name, value in state_dict.items()}, str(path))
    return path


# ------------------------------------------------ the paper's forward pass, transcribed from its definition

def rms_norm(x, weight, eps):
    return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def silu(x):
    return x / (1.0 + np.exp(-x))


def softplus(x):
    return np.logaddexp(0.0, x)


def causal_mask(n):
    return np.tril(np.ones((n, n), bool))


def torch_causal_conv(x, weight, bias):
    """causal_conv1d_fn: x (B, N, C), weight (C, 1, w) taps oldest first, after w - 1 zeros of left padding."""
    w = weight.shape[-1]
    padded = np.concatenate([np.zeros((x.shape[0], w - 1, x.shape[2])), x], axis=1)
    out = sum(weight[:, 0, j] * padded[:, j:j + x.shape[1]] for j in range(w))
    return out if bias is None else out + bias


def interleaved_rope(x, theta=10000.0):
    """rotary_embedding_torch: pairs (x[2i], x[2i+1]) rotated by pos * theta^(-2i/d). x: (B, N, H, d)."""
    n, d = x.shape[1], x.shape[-1]
    angles = np.repeat(np.arange(n)[:, None] * theta ** (-np.arange(0, d, 2) / d), 2, axis=-1)[:, None]  # (N,1,d)
    rotated = np.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
    return x * np.cos(angles) + rotated * np.sin(angles)


def half_rope(x, theta=10000.0):
    """Our convention: pairs (x[i], x[i + d/2]) rotated by pos * theta^(-2i/d). x: (B, N, H, d)."""
    n, d = x.shape[1], x.shape[-1]
    angles = (np.arange(n)[:, None] * theta ** (-np.arange(0, d, 2) / d))[:, None]  # (N, 1, d/2)
    x1, x2 = np.split(x, 2, axis=-1)
    cos, sin = np.cos(angles), np.sin(angles)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def paper_softmax_attention(x, sd, a, rope=interleaved_rope):
    B, N, M = x.shape
    q, k, v = np.split((x @ sd[a + "qkv_proj.weight"].T).reshape(B, N, 3 * HEADS, HEAD_DIM), 3, axis=2)
    q, k = rope(q), rope(k)
    scores = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(HEAD_DIM)
    scores = np.where(causal_mask(N), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    y = np.einsum("bhij,bjhd->bihd", weights, v).reshape(B, N, -1)
    return y @ sd[a + "o_proj.weight"].T


def paper_decayed_attention(x, sd, a, cfg: MixerConfig):
    """The paper's LlamaAttention forward (its non-kernel path), float64."""
    B, N, M = x.shape
    H, d = HEADS, HEAD_DIM
    qkv = x @ sd[a + "qkv_proj.weight"].T
    if cfg.conv_window:
        qkv = torch_causal_conv(qkv, sd[a + "conv1d.weight"], sd[a + "conv1d.bias"])
    q, k, v = np.split(qkv.reshape(B, N, 3 * H, d), 3, axis=2)
    dt = softplus(x @ sd[a + "dt_proj.weight"].T) if cfg.needs_dt else None  # (B, N, H)
    if cfg.decay == "original":
        log_decay = -np.exp(sd[a + "A_log"]) * dt
    elif cfg.decay == "softplus":
        log_decay = -softplus(x @ sd[a + "A_mask_proj.weight"].T)
    else:
        log_decay = np.zeros((B, N, H))
    residual = v * sd[a + "D"] if cfg.d_residual else 0.0
    if cfg.dt_on_values:
        v = v * dt[..., None]
    act = {None: lambda u: u, "relu": lambda u: np.maximum(u, 0.0), "silu": silu}[cfg.qk_activation]
    q, k = act(q), act(k)
    s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(d)
    f = np.exp(s) if cfg.power == "exp" else s ** cfg.power
    g = np.cumsum(log_decay, axis=1).transpose(0, 2, 1)  # (B, H, N)
    decay = np.exp(np.where(causal_mask(N), g[..., :, None] - g[..., None, :], -np.inf))
    w = f * decay
    if cfg.norm == "softmax":
        w = w / w.sum(-1, keepdims=True)
    y = np.einsum("bhij,bjhd->bihd", w, v) + residual
    if cfg.z_gate:
        y = y * silu(x @ sd[a + "z_gate_proj.weight"].T + sd[a + "z_gate_proj.bias"]).reshape(B, N, H, d)
    y = y.reshape(B, N, H * d)
    if cfg.norm == "output":  # torch.nn.RMSNorm(H * d): eps None = the input dtype's machine epsilon
        y = rms_norm(y, sd[a + "out_norm.weight"], np.finfo(y.dtype).eps)
    return y @ sd[a + "o_proj.weight"].T


def paper_mamba2(x, sd, a):
    """mamba_ssm's Mamba2 as the paper builds it (one group, gated RMSNorm after the gate, D per channel)."""
    B, N, M = x.shape
    heads, d_ssm = sd[a + "A_log"].shape[0], sd[a + "norm.weight"].shape[0]
    p = d_ssm // heads
    d_state = (sd[a + "conv1d.weight"].shape[0] - d_ssm) // 2
    d_mlp = (sd[a + "in_proj.weight"].shape[0] - 2 * d_ssm - 2 * d_state - heads) // 2
    z0, x0, z, xbc, dt = np.split(x @ sd[a + "in_proj.weight"].T,
                                  np.cumsum([d_mlp, d_mlp, d_ssm, d_ssm + 2 * d_state]), axis=-1)
    xbc = silu(torch_causal_conv(xbc, sd[a + "conv1d.weight"], sd.get(a + "conv1d.bias")))
    xs, b, c = np.split(xbc, [d_ssm, d_ssm + d_state], axis=-1)
    xs = xs.reshape(B, N, heads, p)
    dt = softplus(dt + sd[a + "dt_bias"])  # (B, N, H)
    g = np.cumsum(dt * -np.exp(sd[a + "A_log"]), axis=1).transpose(0, 2, 1)
    decay = np.exp(np.where(causal_mask(N), g[..., :, None] - g[..., None, :], -np.inf))  # (B, H, N, N)
    y = np.einsum("bin,bjn,bhij,bjh,bjhp->bihp", c, b, decay, dt, xs) + xs * sd[a + "D"].reshape(heads, p)
    y = rms_norm(y.reshape(B, N, d_ssm) * silu(z), sd[a + "norm.weight"], 1e-5)
    y = np.concatenate([silu(z0) * x0, y], axis=-1)
    return y @ sd[a + "out_proj.weight"].T


def paper_mixer(x, sd, a, mixer):
    if isinstance(mixer, AttentionConfig):
        return paper_softmax_attention(x, sd, a)
    if isinstance(mixer, Mamba2Config):
        return paper_mamba2(x, sd, a + "mamba_layer.")
    return paper_decayed_attention(x, sd, a, mixer)


def paper_logits(tokens, sd, mixer, layers=LAYERS):
    h = sd["model.embed_tokens.weight"][tokens]
    for i in range(layers):
        p = f"model.layers.{i}."
        h = h + paper_mixer(rms_norm(h, sd[p + "input_layernorm.weight"], 1e-5), sd, p + "self_attn.", mixer)
        z = rms_norm(h, sd[p + "post_attention_layernorm.weight"], 1e-5)
        h = h + (silu(z @ sd[p + "mlp.gate_proj.weight"].T) * (z @ sd[p + "mlp.up_proj.weight"].T)) @ \
            sd[p + "mlp.down_proj.weight"].T
    return rms_norm(h, sd["model.norm.weight"], 1e-5) @ sd["lm_head.weight"].T


def params(model):
    return {"/".join(map(str, path)): np.asarray(v[...])
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# --------------------------------------------------------------------------------------------- the mapping

def test_decayed_tensors_land_where_the_mapping_says(rng, tmp_path):
    sd = convert.load_paper_state_dict(write(tmp_path / "model.safetensors", paper_state_dict(rng, ALL_FLAGS)))
    model = convert.from_paper(sd, ALL_FLAGS)
    cfg = model.config
    assert (cfg.vocab_size, cfg.model_dim, cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (
        VOCAB, DIM, LAYERS, HEADS, HEAD_DIM, MLP)
    assert convert.from_paper(sd, None, cfg).config == cfg  # a whole ModelConfig is taken as is
    M, H, d = DIM, HEADS, HEAD_DIM
    close = lambda ours, theirs: np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-6)
    close(model.embed[...], sd["model.embed_tokens.weight"])
    close(model.lm_head[...], sd["lm_head.weight"].T)
    close(model.final_norm.scale[...], sd["model.norm.weight"])
    block, p = model.blocks[1], "model.layers.1."
    close(block.mixer_norm.scale[...], sd[p + "input_layernorm.weight"])
    close(block.mlp_norm.scale[...], sd[p + "post_attention_layernorm.weight"])
    close(block.mlp.gate[...], sd[p + "mlp.gate_proj.weight"].T)
    close(block.mlp.down[...], sd[p + "mlp.down_proj.weight"].T)
    mixer, a = block.mixer, p + "self_attn."
    qkv = sd[a + "qkv_proj.weight"]  # rows [q | k | v], each (H, d) head-major
    for s in range(3):
        for h in range(H):
            close(mixer.qkv[:, s, h, :], qkv[s * H * d + h * d:s * H * d + (h + 1) * d].T)
    conv = sd[a + "conv1d.weight"]  # (3Hd, 1, 3): tap 2 on the current token, tap 0 two tokens back
    for back in range(3):
        close(mixer.conv.kernel[back].reshape(-1), conv[:, 0, 2 - back])
    close(mixer.conv.bias[...].reshape(-1), sd[a + "conv1d.bias"])
    close(mixer.dt_proj[...], sd[a + "dt_proj.weight"].T)
    close(mixer.decay_proj[...], sd[a + "A_mask_proj.weight"].T)
    close(mixer.D[...], sd[a + "D"])
    close(mixer.z_proj[...].reshape(M, H * d), sd[a + "z_gate_proj.weight"].T)
    close(mixer.z_bias[...].reshape(-1), sd[a + "z_gate_proj.bias"])
    close(mixer.out_norm.scale[...].reshape(-1), sd[a + "out_norm.weight"])
    close(mixer.out[...].reshape(H * d, M), sd[a + "o_proj.weight"].T)


def test_softmax_qk_head_dims_are_permuted_for_rope_and_v_is_not(rng):
    sd = paper_state_dict(rng, AttentionConfig())
    model = convert.from_paper(sd, "softmax")
    mixer, (q, k, v) = model.blocks[0].mixer, np.split(sd["model.layers.0.self_attn.qkv_proj.weight"], 3)
    perm = np.r_[0:HEAD_DIM:2, 1:HEAD_DIM:2]
    heads = lambda w: w.T.reshape(DIM, HEADS, HEAD_DIM)
    np.testing.assert_allclose(np.asarray(mixer.q_proj[...]), heads(q)[..., perm], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mixer.k_proj[...]), heads(k)[..., perm], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mixer.v_proj[...]), heads(v), rtol=1e-6)
    np.testing.assert_array_equal(convert.rope_permutation(HEAD_DIM), perm)


def test_mamba2_sizes_are_read_off_the_tensors(rng):
    sd = paper_state_dict(rng, presets.mixer_config("mamba"))
    model = convert.from_paper(sd, "mamba")
    cfg = model.config.mixer
    assert (cfg.expand, cfg.head_dim, cfg.d_ssm, cfg.d_state, cfg.conv_window, cfg.conv_bias, cfg.d_has_hdim) == (
        1, HEAD_DIM, HEAD_DIM, D_STATE, 2, False, True)
    mixer, a = model.blocks[0].mixer, "model.layers.0.self_attn.mamba_layer."
    np.testing.assert_allclose(np.asarray(mixer.in_proj[...]), sd[a + "in_proj.weight"].T, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mixer.conv.kernel[...]), sd[a + "conv1d.weight"][:, 0, ::-1].T, rtol=1e-6)
    assert mixer.conv.bias is None
    np.testing.assert_allclose(np.asarray(mixer.D[...]).reshape(-1), sd[a + "D"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mixer.norm_scale[...]).reshape(-1), sd[a + "norm.weight"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mixer.out_proj[...]), sd[a + "out_proj.weight"].T, rtol=1e-6)


def test_bfloat16_checkpoints_load_and_known_buffers_are_skipped(rng, tmp_path):
    sd = {name: value.astype(ml_dtypes.bfloat16) if value.dtype.kind == "f" else value
          for name, value in paper_state_dict(rng, presets.mixer_config("2mamba")).items()}
    sd["model.rotary_emb.inv_freq"] = np.ones(HEAD_DIM // 2, np.float32)  # saved by older transformers, unused
    model = convert.from_paper(convert.load_paper_state_dict(write(tmp_path / "bf16.safetensors", sd)), "2mamba")
    assert model.embed[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(model.lm_head[...]), sd["lm_head.weight"].astype(np.float32).T)


# ----------------------------------------------------------------------------------------------- numerics

def test_softmax_layer_matches_the_papers_interleaved_rope(rng):
    """Our half-rotation RoPE on the permuted q/k weights gives the paper's interleaved-RoPE scores, to float64."""
    sd = paper_state_dict(rng, AttentionConfig())
    model = convert.from_paper(sd, "softmax", **F64)
    mixer, a = model.blocks[0].mixer, "model.layers.0.self_attn."
    x = rng.standard_normal((2, 11, DIM))
    positions = jnp.arange(x.shape[1])
    q, k = (nn.apply_rope(jnp.einsum("bnm,mhd->bnhd", x, w[...]), positions, mixer.config.rope_theta)
            for w in (mixer.q_proj, mixer.k_proj))
    ours = np.einsum("bihd,bjhd->bhij", q, k)
    q_paper, k_paper, _ = np.split((x @ sd[a + "qkv_proj.weight"].T).reshape(2, 11, 3 * HEADS, HEAD_DIM), 3, axis=2)
    theirs = np.einsum("bihd,bjhd->bhij", interleaved_rope(q_paper), interleaved_rope(k_paper))
    assert rel_error(ours, theirs) < 1e-12
    # The whole layer: jax.nn.dot_product_attention takes its softmax in float32 even for float64 inputs.
    assert rel_error(mixer(jnp.asarray(x)), paper_softmax_attention(x, sd, a)) < 1e-6
    # The paper's weights under our half rotation, unpermuted, give another function: the permutation matters.
    assert rel_error(paper_softmax_attention(x, sd, a, rope=half_rope), paper_softmax_attention(x, sd, a)) > 1e-3


@pytest.mark.parametrize("mixer", ["2mamba", "2mamba-dt", "2mamba-e", "linear",
                                   "linear__output_norm__A_mask_type_discretize__in_conv_k_2", "mamba"])
def test_layer_matches_the_papers_forward(rng, mixer):
    cfg = presets.mixer_config(mixer)
    sd = paper_state_dict(rng, cfg)
    model = convert.from_paper(sd, mixer, num_heads=HEADS, **F64)
    x = rng.standard_normal((2, 13, DIM))
    ours = np.asarray(model.blocks[1].mixer(jnp.asarray(x)))
    theirs = paper_mixer(x, sd, "model.layers.1.self_attn.", cfg)
    # The output RMSNorm runs in float32 whatever the compute dtype; everything else here is float64.
    assert rel_error(ours, theirs) < (1e-5 if getattr(cfg, "norm", None) == "output" else 1e-10)


@pytest.mark.parametrize("mixer", ["softmax", "mamba", "2mamba", ALL_FLAGS])
def test_converted_model_logits_match_the_papers_model(rng, mixer):
    cfg = presets.mixer_config(mixer) if isinstance(mixer, str) else mixer
    sd = paper_state_dict(rng, cfg)
    model = convert.from_paper(sd, mixer, **F64)
    tokens = rng.integers(0, VOCAB, (2, 10))
    logits = np.asarray(model(jnp.asarray(tokens)))
    assert np.all(np.isfinite(logits))
    # Logits and RMSNorms are computed in float32 by design.
    assert rel_error(logits, paper_logits(tokens, sd, cfg)) < 1e-5


def test_mixers_without_per_head_tensors_need_the_head_count(rng):
    sd = paper_state_dict(rng, presets.mixer_config("linear"))
    with pytest.raises(convert.ConversionError, match="^num_heads: .*pass num_heads or head_dim"):
        convert.from_paper(sd, "linear")
    assert convert.from_paper(sd, "linear", head_dim=HEAD_DIM).config.num_heads == HEADS
    assert convert.from_paper(sd, "linear", num_heads=HEADS).config.head_dim == HEAD_DIM
    # A size name's sizes are checked against the tensors.
    with pytest.raises(convert.ConversionError, match=r"^model\.embed_tokens\.weight: expected shape \(37, 128\)"):
        convert.from_paper(sd, "linear", "tiny")


# ------------------------------------------------------------------------------------------------------ CLI

def test_cli_writes_a_model_that_loads_back_equal(rng, tmp_path, capsys):
    sd = paper_state_dict(rng, presets.mixer_config("2mamba"))
    (tmp_path / "run").mkdir()
    write(tmp_path / "run" / "model.safetensors", sd)
    assert convert.main([str(tmp_path / "run"), "--mixer", "2mamba", "--output", str(tmp_path / "out")]) == 0
    assert "converted" in capsys.readouterr().out
    loaded = convert.load_converted(tmp_path / "out")
    direct = convert.from_paper(convert.load_paper_state_dict(tmp_path / "run" / "model.safetensors"), "2mamba")
    assert loaded.config == direct.config
    ours, theirs = params(loaded), params(direct)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def _error_cases(rng, tmp_path):
    sd = paper_state_dict(rng, presets.mixer_config("2mamba-dt"))
    a = "model.layers.1.self_attn."
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    extra = sd | {a + "dt_bias_value": np.zeros((1, 1, HEADS))}
    misshapen = sd | {a + "o_proj.weight": np.zeros((DIM, DIM + 1))}
    good = write(tmp_path / "good.safetensors", sd)
    return {
        "missing file": ([str(tmp_path / "nope.safetensors"), "--mixer", "2mamba-dt"], "nope.safetensors"),
        "not safetensors": ([str(_text(tmp_path / "junk.safetensors")), "--mixer", "2mamba-dt"], "junk.safetensors"),
        "missing tensor": ([str(write(tmp_path / "m.safetensors", missing)), "--mixer", "2mamba-dt"],
                           "model.layers.1.mlp.up_proj.weight: missing"),
        "unexpected tensor": ([str(write(tmp_path / "e.safetensors", extra)), "--mixer", "2mamba-dt"],
                              a + "dt_bias_value: unexpected"),
        "wrong shape": ([str(write(tmp_path / "s.safetensors", misshapen)), "--mixer", "2mamba-dt"],
                        a + "o_proj.weight: expected shape"),
        "wrong mixer": ([str(good), "--mixer", "2mamba"], "model.layers.0.self_attn.dt_proj.weight: unexpected"),
        "unknown mixer": ([str(good), "--mixer", "3mamba"], "mixer: expected"),
        "bad size": ([str(good), "--mixer", "2mamba-dt", "--size", "huge"], "size: expected"),
        "bad head count": ([str(good), "--mixer", "2mamba-dt", "--num-heads", "x"], "--num-heads"),
    }


def _text(path):
    path.write_text("not a safetensors file")
    return path


@pytest.mark.parametrize("case", ["missing file", "not safetensors", "missing tensor", "unexpected tensor",
                                  "wrong shape", "wrong mixer", "unknown mixer", "bad size", "bad head count",
                                  "no output"])
def test_cli_errors_are_one_line_naming_the_tensor(rng, tmp_path, capsys, case):
    if case == "no output":
        argv, needle = [str(write(tmp_path / "x.safetensors", {"a": np.zeros(1)})), "--mixer", "2mamba"], "--output"
    else:
        argv, needle = _error_cases(rng, tmp_path)[case]
        argv = argv + ["--output", str(tmp_path / "out")]
    assert convert.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("twomamba-convert: error: ") and needle in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
