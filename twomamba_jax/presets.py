"""Named mixers and model sizes: the rows every table of the project uses, and the paper's 28 ablation configs.

    mixer_config("2mamba")                          # a MixerConfig
    mixer_config("2mamba", chunk_size=128)          # with a field overridden
    mixer_config("squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2")   # a paper config, by its name
    model_config("small", mixer="2mamba")           # a ModelConfig of the paper's 276M model

Output-norm mixers (``mamba2s``, ``linear-out`` and the paper's ``output_norm`` / ``out_norm`` configs) keep
``MixerConfig``'s default ``norm_eps=None``: the output RMSNorm adds the compute dtype's machine epsilon, as the
paper's ``torch.nn.RMSNorm(H * d)`` (no eps given) does. A fixed 1e-5 would move their layer outputs by up to
1e-1 relative. The language model's block norms keep their own ``ModelConfig.norm_eps``.
"""

from __future__ import annotations

import dataclasses

from twomamba_jax.nn import AttentionConfig, Mamba2Config, MixerConfig, ModelConfig

MIXER_PRESETS: dict[str, MixerConfig | Mamba2Config | AttentionConfig] = {
    "linear": MixerConfig(power=1, norm="softmax", conv_window=0, decay="none", qk_activation="relu"),
    "linear-out": MixerConfig(power=1, norm="output", conv_window=0, decay="none"),
    "mamba2s": MixerConfig(power=1, norm="output", conv_window=2, decay="softplus", dt_on_values=True),
    "2mamba": MixerConfig(power=2, norm="softmax", conv_window=2, decay="softplus"),
    "2mamba-dt": MixerConfig(power=2, norm="softmax", conv_window=2, decay="softplus", dt_on_values=True),
    "2mamba-e": MixerConfig(power="exp", norm="softmax", conv_window=2, decay="softplus"),
    "softmax": AttentionConfig(),
    "mamba2": Mamba2Config(),
    # The paper's Mamba-2 baseline: one SSM head of width 64 beside a gated-MLP branch (expand 1, conv 2).
    "mamba2-paper": Mamba2Config(expand=1, head_dim=64, d_ssm=64, conv_window=2, conv_bias=False, d_has_hdim=True),
}


def _paper(power, norm, *, conv=0, decay="none", act=None, d_res=False, z_gate=False, dt=False) -> MixerConfig:
    return MixerConfig(power=power, norm=norm, conv_window=conv, decay=decay, qk_activation=act,
                       d_residual=d_res, z_gate=z_gate, dt_on_values=dt)


_LIN_SP_C2 = dict(conv=2, decay="softplus")

# The configuration names of the paper's code, each with the flags that reproduce it. Name tokens:
# linear / squared / exp = power 1 / 2 / exp; sm_norm, output_norm (also spelled out_norm) = the normalization;
# in_conv_k_W = conv window W; silu / ReLU = the q, k activation; A_mask_type_discretize = Mamba-2's "original"
# decay; A_mask_type_neg_softplus = the softplus decay; D_res, Z_out_gate, dt_on_values = those flags.
PAPER_CONFIGS: dict[str, MixerConfig | Mamba2Config | AttentionConfig] = {
    "softmax": MIXER_PRESETS["softmax"],
    "mamba": MIXER_PRESETS["mamba2-paper"],
    "linear": _paper(1, "softmax", act="relu"),
    "linear__output_norm": _paper(1, "output"),
    "linear__output_norm__ReLU": _paper(1, "output", act="relu"),
    **{f"linear__output_norm__in_conv_k_{w}": _paper(1, "output", conv=w) for w in (2, 3, 4)},
    **{f"linear__output_norm__in_conv_k_{w}__silu": _paper(1, "output", conv=w, act="silu") for w in (2, 3, 4)},
    "linear__output_norm__D_res": _paper(1, "output", d_res=True),
    "linear__output_norm__Z_out_gate": _paper(1, "output", z_gate=True),
    "linear__output_norm__dt_on_values": _paper(1, "output", dt=True),
    "linear__output_norm__A_mask_type_discretize": _paper(1, "output", decay="original"),
    "linear__output_norm__A_mask_type_neg_softplus": _paper(1, "output", decay="softplus"),
    "linear__output_norm__A_mask_type_discretize__in_conv_k_2": _paper(1, "output", conv=2, decay="original"),
    "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2": _paper(1, "output", **_LIN_SP_C2),
    "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values":
        _paper(1, "output", dt=True, **_LIN_SP_C2),
    "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values__silu":
        _paper(1, "output", dt=True, act="silu", **_LIN_SP_C2),
    "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values__D_res":
        _paper(1, "output", dt=True, d_res=True, **_LIN_SP_C2),
    "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values__Z_out_gate":
        _paper(1, "output", dt=True, z_gate=True, **_LIN_SP_C2),
    "squared__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values":
        _paper(2, "output", dt=True, **_LIN_SP_C2),
    "squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values":
        _paper(2, "softmax", dt=True, **_LIN_SP_C2),
    "squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2": _paper(2, "softmax", **_LIN_SP_C2),
    "linear__out_norm__A_mask_type_neg_softplus__in_conv_k_2": _paper(1, "output", **_LIN_SP_C2),
    "exp__sm_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values":
        _paper("exp", "softmax", dt=True, **_LIN_SP_C2),
    "exp__sm_norm__A_mask_type_neg_softplus__in_conv_k_2": _paper("exp", "softmax", **_LIN_SP_C2),
}

MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(model_dim=128, num_layers=2, num_heads=4, head_dim=32, mlp_dim=256),
    "small": dict(model_dim=1024, num_layers=20, num_heads=16, head_dim=64, mlp_dim=2048),
    "medium": dict(model_dim=1536, num_layers=27, num_heads=24, head_dim=64, mlp_dim=3072),
}


def mixer_config(name: str, **overrides) -> MixerConfig | Mamba2Config | AttentionConfig:
    """The mixer config of a preset (``MIXER_PRESETS``) or paper config (``PAPER_CONFIGS``), fields overridden."""
    config = MIXER_PRESETS.get(name) or PAPER_CONFIGS.get(name)
    if config is None:
        raise ValueError(f"name: expected a mixer preset {sorted(MIXER_PRESETS)} or one of the "
                         f"{len(PAPER_CONFIGS)} names in PAPER_CONFIGS; got {name!r}")
    fields = {field.name for field in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"overrides: {unknown} are not fields of {type(config).__name__}; expected some of "
                         f"{sorted(fields)}")
    return dataclasses.replace(config, **overrides)


def model_config(size: str, *, mixer: str = "2mamba", vocab_size: int = 32000, **overrides) -> ModelConfig:
    """A ``ModelConfig`` of a named size (``MODEL_SIZES``) with a named mixer; other fields via ``overrides``."""
    if size not in MODEL_SIZES:
        raise ValueError(f"size: expected one of {sorted(MODEL_SIZES)}; got {size!r}")
    return ModelConfig(vocab_size=vocab_size, mixer=mixer_config(mixer), **{**MODEL_SIZES[size], **overrides})
