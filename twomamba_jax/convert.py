"""Import the paper's PyTorch checkpoints: its ``LlamaForCausalLM`` state dict -> a ``nn.LanguageModel``.

    state_dict = convert.load_paper_state_dict("run/model.safetensors")    # numpy arrays; torch is not needed
    model = convert.from_paper(state_dict, "squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2")
    convert.save_converted(model, "converted/")       # params.safetensors + config.json
    model = convert.load_converted("converted/")

or, from a shell, ``twomamba-convert run/model.safetensors --mixer NAME --output converted/``.

The paper's trainer saves a transformers ``LlamaForCausalLM`` whose decoder layers are its own
``LlamaDecoderLayer``, with ``save_pretrained`` (one ``model.safetensors``). Only the mixer preset has to be
given (the checkpoint does not record it); the sizes are read off the tensors. Conventions bridged:

- ``nn.Linear`` stores (out, in); ours store (in, out), the out side split into named axes, e.g. (M, 3, H, d).
- ``qkv_proj`` rows (and the fused conv channels) are [q | k | v], each head-major: row ``s*H*d + h*d + i``.
- The depthwise ``Conv1d`` stores (channels, 1, w) taps oldest first: after the causal padding, tap ``w - 1``
  multiplies the current token. Our ``CausalConv.kernel[s]`` multiplies the token ``s`` steps back, so
  ``kernel[s] = weight[:, 0, w - 1 - s]``.
- Softmax attention: the paper rotates interleaved pairs (x[2i], x[2i+1]) of q and k (rotary_embedding_torch);
  ours rotates halves (x[i], x[i + d/2]), pair i at the same angle ``pos * theta^(-2i/d)``. Reordering each q and
  k head's dims as [0, 2, 4, ..., 1, 3, 5, ...] turns one rotation into the other and leaves every q.k unchanged,
  so the q and k rows of ``qkv_proj`` are permuted that way (v and o_proj are not). No other mixer uses RoPE.
- The Mamba-2 baseline is mamba_ssm's ``Mamba2`` at ``model.layers.N.self_attn.mamba_layer``; its sizes (heads,
  head dim, d_state, expand, conv window and bias, D per channel or per head) are read off its tensors.

Buffers that are not parameters are skipped by name (``IGNORED_BUFFERS``); every other tensor must map to a
parameter, and a missing, unexpected or misshapen tensor is a ``ConversionError`` naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from twomamba_jax import presets
from twomamba_jax.nn import AttentionConfig, LanguageModel, Mamba2Config, MixerConfig, ModelConfig

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
_MIXER_TYPES = {cls.__name__: cls for cls in (MixerConfig, Mamba2Config, AttentionConfig)}
_LAYER = re.compile(r"model\.layers\.(\d+)\.")

# Tensors of the paper's checkpoints that are buffers, not parameters: skipped (the rotary frequencies are
# checked against the config's theta first).
IGNORED_BUFFERS = {
    r"model\.layers\.\d+\.self_attn\.attn_mask": "the decayed layers' precomputed causal mask",
    r"model\.layers\.\d+\.self_attn\.rotary_emb\.freqs": "softmax attention's RoPE frequencies (checked)",
    r"model\.rotary_emb\.inv_freq": "transformers' rotary buffer, unused by the paper's layers",
}


class ConversionError(ValueError):
    """A checkpoint or argument that cannot be converted; the message is one line naming it."""


StatePath = tuple  # a parameter's path in the model's nnx.State, e.g. ("blocks", 0, "mixer", "qkv")


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One paper tensor: its name, expected shape, and how it becomes our parameter(s)."""

    name: str
    shape: tuple[int, ...]
    convert: Callable[[np.ndarray], dict[StatePath, np.ndarray]]


def load_paper_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file (or of ``model.safetensors`` in a directory) as numpy arrays."""
    safetensors = _safetensors_numpy()
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise ConversionError(f"{path}: no such file; expected the paper's model.safetensors (or its directory)")
    try:
        return safetensors.load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise ConversionError(f"{path}: not a readable safetensors file ({_one_line(error)})") from error


def from_paper(state_dict: Mapping[str, np.ndarray], mixer, base: str | ModelConfig | None = None,
               **overrides) -> LanguageModel:
    """A ``LanguageModel`` holding the paper checkpoint's weights.

    state_dict: the paper's tensors by name (``load_paper_state_dict``).
    mixer: the mixer preset or paper config name (``presets.mixer_config``) or a mixer config object; None keeps
      the mixer of a ``ModelConfig`` ``base``.
    base: None (every size read off the tensors), a size name of ``presets.MODEL_SIZES`` (its sizes, checked
      against the tensors), or a whole ``ModelConfig``.
    overrides: ``ModelConfig`` fields, e.g. ``num_heads`` / ``head_dim`` where the tensors do not tell them
      (mixers without per-head tensors), ``dtype``, ``param_dtype``.
    """
    config = infer_model_config(state_dict, mixer, base, **overrides)
    return _build(config, paper_to_params(state_dict, config, label=mixer if isinstance(mixer, str) else None))


def infer_model_config(state_dict: Mapping[str, np.ndarray], mixer, base: str | ModelConfig | None = None,
                       **overrides) -> ModelConfig:
    """The ``ModelConfig`` of a paper checkpoint; arguments as ``from_paper``."""
    if isinstance(base, ModelConfig):
        config = base if mixer is None else dataclasses.replace(base, mixer=_mixer_config(mixer))
        return dataclasses.replace(config, **_check_fields(overrides))
    if base is not None and base not in presets.MODEL_SIZES:
        raise ConversionError(f"size: expected one of {sorted(presets.MODEL_SIZES)} or a ModelConfig; got {base!r}")
    mixer = _mixer_config(mixer)
    vocab_size, model_dim = _shape(state_dict, "model.embed_tokens.weight", 2)
    fields = dict(vocab_size=vocab_size, model_dim=model_dim, num_layers=_num_layers(state_dict),
                  mlp_dim=_shape(state_dict, "model.layers.0.mlp.gate_proj.weight", 2)[0])
    fields.update(presets.MODEL_SIZES.get(base, {}))
    fields.update(_check_fields(overrides))
    if isinstance(mixer, Mamba2Config):
        mixer = _infer_mamba2(state_dict, mixer, fields["model_dim"])
        fields.setdefault("num_heads", mixer.d_ssm // mixer.head_dim)  # unused by a Mamba-2 block
        fields.setdefault("head_dim", mixer.head_dim)
    else:
        fields["num_heads"], fields["head_dim"] = _infer_heads(state_dict, mixer, fields.get("num_heads"),
                                                               fields.get("head_dim"))
    return ModelConfig(mixer=mixer, **fields)


def paper_to_params(state_dict: Mapping[str, np.ndarray], config: ModelConfig, *,
                    label: str | None = None) -> dict[StatePath, np.ndarray]:
    """Our parameters by ``nnx.State`` path, from the paper's tensors; every tensor must be used or ignorable.

    label: the mixer's name for error messages (default: the preset name its config equals, if any).
    """
    dtype = np.dtype(config.param_dtype)
    label = repr(label) if label else _mixer_label(config.mixer)
    entries = _entries(config)
    params: dict[StatePath, np.ndarray] = {}
    for entry in entries:
        if entry.name not in state_dict:
            raise ConversionError(f"{entry.name}: missing from the checkpoint; expected a tensor of shape "
                                  f"{entry.shape} for mixer {label}")
        tensor = np.asarray(state_dict[entry.name])
        if tensor.shape != entry.shape:
            raise ConversionError(f"{entry.name}: expected shape {entry.shape}; got {tensor.shape}")
        if not jnp.issubdtype(tensor.dtype, jnp.floating):
            raise ConversionError(f"{entry.name}: expected a floating-point tensor; got dtype {tensor.dtype}")
        params.update(entry.convert(tensor.astype(dtype)))
    used = {entry.name for entry in entries}
    for name in sorted(state_dict, key=_natural_key):
        if name not in used and not _is_ignored(name, np.asarray(state_dict[name]), config):
            raise ConversionError(f"{name}: unexpected tensor of shape {tuple(np.shape(state_dict[name]))}; mixer "
                                  f"{label} has no such parameter (wrong mixer?)")
    return params


def save_converted(model: LanguageModel, directory: str | Path) -> Path:
    """Writes ``params.safetensors`` (our parameters, keys like ``blocks/0/mixer/qkv``) and ``config.json``."""
    safetensors = _safetensors_numpy()
    directory = Path(directory)
    arrays = {"/".join(map(str, path)): np.ascontiguousarray(np.asarray(variable[...]))
              for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        safetensors.save_file(arrays, str(directory / PARAMS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(_config_to_json(model.config), indent=2) + "\n")
    except OSError as error:
        raise ConversionError(f"output: cannot write to {directory} ({error.strerror or error})") from error
    return directory


def load_converted(directory: str | Path) -> LanguageModel:
    """The ``LanguageModel`` that ``save_converted`` (or ``twomamba-convert``) wrote to ``directory``."""
    safetensors = _safetensors_numpy()
    directory = Path(directory)
    for name in (CONFIG_FILE, PARAMS_FILE):
        if not (directory / name).is_file():
            raise ConversionError(f"{directory / name}: no such file; expected the output of twomamba-convert")
    config = _config_from_json(json.loads((directory / CONFIG_FILE).read_text()))
    arrays = safetensors.load_file(str(directory / PARAMS_FILE))
    return _build(config, {tuple(int(p) if p.isdigit() else p for p in key.split("/")): value
                           for key, value in arrays.items()})


# ---------------------------------------------------------------------------------------------- the mapping

def _entries(config: ModelConfig) -> list[_Entry]:
    """Every paper tensor the config needs, in checkpoint order."""
    M, V, F = config.model_dim, config.vocab_size, config.mlp_dim
    entries = [_Entry("model.embed_tokens.weight", (V, M), _to(("embed",)))]
    for i in range(config.num_layers):
        p, block = f"model.layers.{i}.", ("blocks", i)
        entries += [
            _Entry(p + "input_layernorm.weight", (M,), _to((*block, "mixer_norm", "scale"))),
            *_mixer_entries(config, p + "self_attn.", (*block, "mixer")),
            _Entry(p + "post_attention_layernorm.weight", (M,), _to((*block, "mlp_norm", "scale"))),
            _Entry(p + "mlp.gate_proj.weight", (F, M), _to((*block, "mlp", "gate"), np.transpose)),
            _Entry(p + "mlp.up_proj.weight", (F, M), _to((*block, "mlp", "up"), np.transpose)),
            _Entry(p + "mlp.down_proj.weight", (M, F), _to((*block, "mlp", "down"), np.transpose)),
        ]
    entries += [_Entry("model.norm.weight", (M,), _to(("final_norm", "scale"))),
                _Entry("lm_head.weight", (V, M), _to(("lm_head",), np.transpose))]
    return entries


def _mixer_entries(config: ModelConfig, p: str, at: StatePath) -> list[_Entry]:
    mixer, M = config.mixer, config.model_dim
    if isinstance(mixer, Mamba2Config):
        return _mamba2_entries(mixer, M, p + "mamba_layer.", at)
    H, d = config.num_heads, config.head_dim
    out = _Entry(p + "o_proj.weight", (M, H * d), _to((*at, "out"), lambda w: w.T.reshape(H, d, M)))
    if isinstance(mixer, AttentionConfig):
        if (mixer.num_kv_heads or H) != H:
            raise ConversionError(f"mixer: the paper's softmax attention has one key/value head per query head; "
                                  f"got num_kv_heads={mixer.num_kv_heads} for {H} heads")
        rope = rope_permutation(d)

        def split_qkv(w):
            q, k, v = np.moveaxis(w.T.reshape(M, 3, H, d), 1, 0)
            return {(*at, "q_proj"): q[..., rope], (*at, "k_proj"): k[..., rope], (*at, "v_proj"): v}

        return [_Entry(p + "qkv_proj.weight", (3 * H * d, M), split_qkv), out]

    heads, channels = (H, d), (3, H, d)
    entries = [_Entry(p + "qkv_proj.weight", (3 * H * d, M), _to((*at, "qkv"), lambda w: w.T.reshape(M, *channels)))]
    if mixer.conv_window:
        entries += _conv_entries(p, mixer.conv_window, channels, (*at, "conv"), bias=True)
    if mixer.needs_dt:
        entries.append(_Entry(p + "dt_proj.weight", (H, M), _to((*at, "dt_proj"), np.transpose)))
    if mixer.decay == "original":
        entries.append(_Entry(p + "A_log", (H,), _to((*at, "A_log"))))
    elif mixer.decay == "softplus":
        entries.append(_Entry(p + "A_mask_proj.weight", (H, M), _to((*at, "decay_proj"), np.transpose)))
    if mixer.d_residual:
        entries.append(_Entry(p + "D", heads, _to((*at, "D"))))
    if mixer.z_gate:
        entries += [_Entry(p + "z_gate_proj.weight", (H * d, M), _to((*at, "z_proj"), lambda w: w.T.reshape(M, H, d))),
                    _Entry(p + "z_gate_proj.bias", (H * d,), _to((*at, "z_bias"), lambda b: b.reshape(heads)))]
    if mixer.norm == "output":
        entries.append(_Entry(p + "out_norm.weight", (H * d,), _to((*at, "out_norm", "scale"),
                                                                   lambda w: w.reshape(heads))))
    return entries + [out]


def _mamba2_entries(cfg: Mamba2Config, M: int, p: str, at: StatePath) -> list[_Entry]:
    d_inner = cfg.expand * M
    d_ssm = cfg.d_ssm or d_inner
    heads = d_ssm // cfg.head_dim
    conv_dim = d_ssm + 2 * cfg.num_groups * cfg.d_state
    in_dim = 2 * (d_inner - d_ssm) + d_ssm + conv_dim + heads  # [z0, x0 | z | xBC | dt], as mamba_ssm orders it
    d_shape = (heads, cfg.head_dim) if cfg.d_has_hdim else (heads,)
    return [
        _Entry(p + "in_proj.weight", (in_dim, M), _to((*at, "in_proj"), np.transpose)),
        *_conv_entries(p, cfg.conv_window, (conv_dim,), (*at, "conv"), bias=cfg.conv_bias),
        _Entry(p + "dt_bias", (heads,), _to((*at, "dt_bias"))),
        _Entry(p + "A_log", (heads,), _to((*at, "A_log"))),
        _Entry(p + "D", (int(np.prod(d_shape)),), _to((*at, "D"), lambda D: D.reshape(d_shape))),
        _Entry(p + "norm.weight", (d_ssm,), _to((*at, "norm_scale"), lambda w: w.reshape(heads, cfg.head_dim))),
        _Entry(p + "out_proj.weight", (M, d_inner), _to((*at, "out_proj"), np.transpose)),
    ]


def _conv_entries(p: str, window: int, channels: tuple[int, ...], at: StatePath, *, bias: bool) -> list[_Entry]:
    """torch (C, 1, w), oldest tap first -> ours (w, *channels), tap s on the token s steps back."""
    size = int(np.prod(channels))
    entries = [_Entry(p + "conv1d.weight", (size, 1, window),
                      _to((*at, "kernel"), lambda w: w[:, 0, ::-1].T.reshape(window, *channels)))]
    if bias:
        entries.append(_Entry(p + "conv1d.bias", (size,), _to((*at, "bias"), lambda b: b.reshape(channels))))
    return entries


def rope_permutation(head_dim: int) -> np.ndarray:
    """Our q/k dim j takes the paper's dim ``perm[j]``: [0, 2, ..., d-2, 1, 3, ..., d-1] (interleaved -> halves)."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def _to(path: StatePath, fn: Callable[[np.ndarray], np.ndarray] = lambda x: x):
    return lambda tensor: {path: np.ascontiguousarray(fn(tensor))}


def _is_ignored(name: str, tensor: np.ndarray, config: ModelConfig) -> bool:
    if not any(re.fullmatch(pattern, name) for pattern in IGNORED_BUFFERS):
        return False
    if name.endswith("rotary_emb.freqs"):
        if not isinstance(config.mixer, AttentionConfig):
            return False  # only softmax attention has RoPE
        theta, d = config.mixer.rope_theta, config.head_dim
        expected = 1.0 / theta ** (np.arange(0, d, 2) / d)
        if tensor.shape != expected.shape or not np.allclose(tensor.astype(np.float64), expected, rtol=1e-5):
            raise ConversionError(f"{name}: expected the {d // 2} RoPE frequencies theta^(-2i/d) of theta={theta} "
                                  f"and head dim {d}; got shape {tensor.shape}, values that differ")
    return True


# ------------------------------------------------------------------------------------------------- sizes

def _mixer_config(mixer):
    if isinstance(mixer, (MixerConfig, Mamba2Config, AttentionConfig)):
        return mixer
    if not isinstance(mixer, str) or (mixer not in presets.MIXER_PRESETS and mixer not in presets.PAPER_CONFIGS):
        raise ConversionError(f"mixer: expected a preset {sorted(presets.MIXER_PRESETS)}, one of the "
                              f"{len(presets.PAPER_CONFIGS)} paper config names (presets.PAPER_CONFIGS) or a mixer "
                              f"config; got {mixer!r}")
    return presets.mixer_config(mixer)


def _check_fields(overrides: dict) -> dict:
    fields = {field.name for field in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConversionError(f"overrides: {unknown} are not ModelConfig fields; expected some of {sorted(fields)}")
    return overrides


def _shape(state_dict, name: str, ndim: int) -> tuple[int, ...]:
    if name not in state_dict:
        raise ConversionError(f"{name}: missing from the checkpoint; expected the paper's LlamaForCausalLM tensors")
    shape = tuple(np.shape(state_dict[name]))
    if len(shape) != ndim:
        raise ConversionError(f"{name}: expected a {ndim}-d tensor; got shape {shape}")
    return shape


def _num_layers(state_dict) -> int:
    layers = {int(match.group(1)) for name in state_dict if (match := _LAYER.match(name))}
    if not layers:
        raise ConversionError("model.layers.0: no decoder layer tensors in the checkpoint; expected the paper's "
                              "LlamaForCausalLM tensors")
    gaps = sorted(set(range(max(layers) + 1)) - layers)
    if gaps:
        raise ConversionError(f"model.layers.{gaps[0]}: missing from the checkpoint; expected layers 0 to "
                              f"{max(layers)}")
    return max(layers) + 1


def _infer_heads(state_dict, mixer, num_heads: int | None, head_dim: int | None) -> tuple[int, int]:
    """(H, d) from per-head tensors where the mixer has some; H * d is o_proj's input width."""
    p = "model.layers.0.self_attn."
    width = _shape(state_dict, p + "o_proj.weight", 2)[1]
    if num_heads is None and head_dim is None:
        for name in ("A_mask_proj.weight", "dt_proj.weight", "A_log", "D"):
            if p + name in state_dict:
                num_heads = np.shape(state_dict[p + name])[0]
                break
        if p + "rotary_emb.freqs" in state_dict:
            head_dim = 2 * np.shape(state_dict[p + "rotary_emb.freqs"])[0]
    if num_heads is None and head_dim is None:
        raise ConversionError(f"num_heads: mixer {_mixer_label(mixer)} has no per-head tensor to read the head count "
                              "from; pass num_heads or head_dim (--num-heads / --head-dim; the paper's small and "
                              "medium models use head_dim 64)")
    if num_heads is None:
        num_heads = width // head_dim if head_dim and width % head_dim == 0 else None
    if head_dim is None:
        head_dim = width // num_heads if num_heads and width % num_heads == 0 else None
    if not num_heads or not head_dim:
        raise ConversionError(f"{p}o_proj.weight: its input width {width} is not num_heads x head_dim for the given "
                              "num_heads / head_dim")
    return num_heads, head_dim


def _infer_mamba2(state_dict, base: Mamba2Config, model_dim: int) -> Mamba2Config:
    """The preset's Mamba2Config with the sizes of layer 0's ``mamba_layer`` tensors."""
    p = "model.layers.0.self_attn.mamba_layer."
    heads = _shape(state_dict, p + "A_log", 1)[0]
    d_ssm = _shape(state_dict, p + "norm.weight", 1)[0]
    conv_dim, _, window = _shape(state_dict, p + "conv1d.weight", 3)
    d_inner = _shape(state_dict, p + "out_proj.weight", 2)[1]
    d_state, remainder = divmod(conv_dim - d_ssm, 2 * base.num_groups)
    if d_ssm % heads or d_inner % model_dim or remainder or d_state <= 0:
        raise ConversionError(f"{p}*: sizes heads={heads} (A_log), d_ssm={d_ssm} (norm.weight), conv dim {conv_dim} "
                              f"(conv1d.weight), d_inner={d_inner} (out_proj.weight) do not form a Mamba-2 block of "
                              f"width {model_dim} with {base.num_groups} group(s)")
    return dataclasses.replace(base, expand=d_inner // model_dim, head_dim=d_ssm // heads, d_ssm=d_ssm,
                               d_state=d_state, conv_window=window, conv_bias=p + "conv1d.bias" in state_dict,
                               d_has_hdim=np.shape(state_dict.get(p + "D", ()))[:1] != (heads,))


def _mixer_label(mixer) -> str:
    for table in (presets.MIXER_PRESETS, presets.PAPER_CONFIGS):
        for name, config in table.items():
            if config == mixer:
                return repr(name)
    return type(mixer).__name__


# -------------------------------------------------------------------------------------- model and files

def _build(config: ModelConfig, params: dict[StatePath, np.ndarray]) -> LanguageModel:
    """A LanguageModel of ``config`` holding ``params`` (no random init: the structure comes from eval_shape)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0))))
    leaves, params = [], dict(params)
    for path, variable in nnx.to_flat_state(state):
        value = params.pop(path, None)
        if value is None or value.shape != variable.shape:
            raise ConversionError(f"{'/'.join(map(str, path))}: expected a parameter of shape {variable.shape}; got "
                                  f"{'none' if value is None else value.shape}")
        leaves.append((path, variable.replace(jnp.asarray(value, variable.dtype))))
    if params:
        raise ConversionError(f"{'/'.join(map(str, next(iter(params))))}: not a parameter of this model")
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _config_to_json(config: ModelConfig) -> dict:
    out = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    out["mixer"] = {"type": type(config.mixer).__name__, **dataclasses.asdict(config.mixer)}
    out["dtype"], out["param_dtype"] = np.dtype(config.dtype).name, np.dtype(config.param_dtype).name
    return out


def _config_from_json(data: dict) -> ModelConfig:
    mixer = dict(data["mixer"])
    cls = _MIXER_TYPES[mixer.pop("type")]
    mixer = cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in mixer.items()})
    dtypes = {key: jnp.dtype(data[key]) for key in ("dtype", "param_dtype")}
    return ModelConfig(**{**data, "mixer": mixer, **dtypes})


def _safetensors_numpy():
    """safetensors.numpy, imported only when a file is read or written: the core install does not need it."""
    try:
        import safetensors.numpy
    except ImportError as error:
        raise ConversionError("safetensors is not installed: pip install 'twomamba_jax[train]' "
                              "(or pip install 'safetensors>=0.4')") from error
    import ml_dtypes  # noqa: F401  (a jax dependency; registers bfloat16 with numpy, so bf16 checkpoints load)

    return safetensors.numpy


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# ------------------------------------------------------------------------------------------------------ CLI

USAGE = """Convert a checkpoint of the paper's PyTorch code (model.safetensors of its LlamaForCausalLM) into a
twomamba_jax LanguageModel: DIR/params.safetensors and DIR/config.json, loaded back with
twomamba_jax.convert.load_converted(DIR).

  twomamba-convert run/model.safetensors --mixer squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2 --output out
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2 (through main), not argparse's usage block
        raise ConversionError(message)


def main(argv: list[str] | None = None) -> int:
    """``twomamba-convert``: returns 0, or 2 with one line on stderr for a bad argument or checkpoint."""
    parser = _Parser(prog="twomamba-convert", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the paper's model.safetensors, or the directory holding it")
    parser.add_argument("--mixer", required=True,
                        help="the checkpoint's mixer: a preset (twomamba_jax.presets.MIXER_PRESETS) or the paper's "
                             "config name (presets.PAPER_CONFIGS), e.g. softmax, mamba, "
                             "squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2")
    parser.add_argument("--output", required=True, help="directory to write params.safetensors and config.json to")
    parser.add_argument("--size", help="a size name (tiny, small, medium) whose sizes are checked against the tensors")
    parser.add_argument("--num-heads", type=int, help="head count, for mixers without per-head tensors")
    parser.add_argument("--head-dim", type=int, help="head dim, for mixers without per-head tensors")
    try:
        args = parser.parse_args(argv)
        overrides = {key: value for key, value in (("num_heads", args.num_heads), ("head_dim", args.head_dim))
                     if value is not None}
        state_dict = load_paper_state_dict(args.checkpoint)
        model = from_paper(state_dict, args.mixer, args.size, **overrides)
        directory = save_converted(model, args.output)
    except ValueError as error:  # ConversionError, and the ValueErrors of the configs (one line naming the field)
        print(f"twomamba-convert: error: {_one_line(error)}", file=sys.stderr)
        return 2
    config = model.config
    count = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    print(f"converted {len(state_dict)} tensors: mixer {args.mixer}, {config.num_layers} layers, width "
          f"{config.model_dim}, vocabulary {config.vocab_size}, {count / 1e6:.2f}M parameters -> "
          f"{directory / PARAMS_FILE}, {directory / CONFIG_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
