"""The training config: typed dataclasses, loaded by name or path, overridden with ``--config.section.key=value``.

Dataclasses rather than ConfigDicts: every field has a type (overrides are parsed and checked against it), a
default and a help line, so ``twomamba-train --help`` lists them all and a misspelt key is an error naming the
section's fields.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import types
import typing
from pathlib import Path


def _field(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class ModelConfig:
    size: str = _field("tiny", "tiny | small | medium (twomamba_jax.presets.MODEL_SIZES)")
    mixer: str = _field("2mamba", "a mixer preset or paper config name (twomamba_jax.presets)")
    chunk_size: int | None = _field(None, "override of the mixer's chunk size")
    impl: str | None = _field(None, "override of the mixer's decayed_attention impl (auto, pallas, chunked, ...)")
    remat: bool = _field(False, "rematerialize each block in the backward (saves activation memory)")
    remat_policy: str = _field("full", "with remat, what the backward recomputes: full (the whole block) | "
                                       "save_attention (all but the attention kernels' forwards)")
    model_dim: int | None = _field(None, "override of the size's model width M")
    num_layers: int | None = _field(None, "override of the size's layer count")
    num_heads: int | None = _field(None, "override of the size's head count")
    head_dim: int | None = _field(None, "override of the size's head dim")
    mlp_dim: int | None = _field(None, "override of the size's SwiGLU width")


@dataclasses.dataclass
class DataConfig:
    source: str = _field("mqar", "mqar | needle | tfds:NAME[/CONFIG] | text:PATH_OR_GLOB")
    seq_len: int = _field(64, "tokens per row")
    batch_size: int = _field(32, "rows per step, over all processes")
    seed: int = _field(0, "seed of the data order and of the synthetic tasks")
    tokenizer: str = _field("byte", "byte | a SentencePiece model file (text sources)")
    vocab_size: int = _field(128, "synthetic tasks: token ids in [0, vocab_size)")
    num_kv_pairs: int = _field(8, "mqar: key-value pairs per row")
    tfds_data_dir: str = _field("", "tfds: where datasets are prepared and read (empty: TFDS's default)")
    eval_split: str = _field("validation", "tfds: split to evaluate on (text files: the last eval_fraction)")
    eval_fraction: float = _field(0.05, "text files: fraction of documents held out for eval")
    niah_fraction: float = _field(0.0, "text: fraction of training rows made pass-key retrieval prompts with answers")
    cross_document: bool = _field(False, "text: let tokens see the earlier documents packed into their row (off: "
                                         "each document is masked to itself)")


@dataclasses.dataclass
class OptimConfig:
    learning_rate: float = _field(3e-3, "peak learning rate")
    warmup_steps: int = _field(100, "linear warmup from 0")
    schedule: str = _field("cosine", "decay after warmup: cosine | linear | constant")
    final_lr_ratio: float = _field(0.1, "final learning rate / peak")
    weight_decay: float = _field(0.1, "AdamW weight decay")
    decay_mask: str = _field("matrices", "what weight decay applies to: matrices (ndim >= 2) | all")
    b1: float = _field(0.9, "Adam beta1")
    b2: float = _field(0.95, "Adam beta2")
    eps: float = _field(1e-8, "Adam epsilon")
    grad_clip: float = _field(1.0, "global-norm gradient clipping; 0 turns it off")
    accumulate: int = _field(1, "micro-batches per step (gradient accumulation)")


@dataclasses.dataclass
class MeshConfig:
    data: int = _field(-1, "data-parallel axis size (-1: the devices left)")
    fsdp: int = _field(1, "FSDP axis size: parameters and optimizer state sharded over the model width")
    tensor: int = _field(1, "tensor-parallel axis size: heads, MLP and vocabulary split")
    num_processes: int = _field(1, "processes of a multi-host run; > 1 calls jax.distributed.initialize()")
    coordinator_address: str = _field("", "host:port of process 0 (empty: detected by jax on TPU pods / SLURM)")
    process_id: int = _field(-1, "this process's index (-1: detected)")


@dataclasses.dataclass
class CheckpointConfig:
    every: int = _field(200, "save every this many steps (and at the end, and on SIGTERM)")
    keep: int = _field(3, "checkpoints kept")
    async_save: bool = _field(True, "write checkpoints in the background")


@dataclasses.dataclass
class EvalConfig:
    every: int = _field(100, "evaluate every this many steps (and at the end); 0 turns it off")
    batches: int = _field(4, "eval batches")


@dataclasses.dataclass
class TrainConfig:
    steps: int = _field(1000, "optimizer steps")
    precision: str = _field("float32", "compute dtype: float32 | bfloat16 (parameters stay float32)")
    seed: int = _field(0, "seed of the parameter initialization")
    allow_data_change: bool = _field(False, "resume even if the data settings (data.source, seq_len, seed, ...) "
                                            "differ from the run's config.json")
    log_every: int = _field(10, "steps between progress lines and logged metrics")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


NAMED_CONFIGS = ("tiny", "small", "medium")


def load_config(name_or_path: str) -> TrainConfig:
    """A config by name (``twomamba_jax.configs.<name>``) or from a ``.py`` file; both define ``get_config()``."""
    if name_or_path in NAMED_CONFIGS:
        module = importlib.import_module(f"twomamba_jax.configs.{name_or_path}")
    else:
        path = Path(name_or_path)
        if path.suffix != ".py" or not path.is_file():
            missing = " (no such file)" if path.suffix == ".py" else ""
            raise ValueError(f"--config: expected one of {', '.join(NAMED_CONFIGS)} or a .py file defining "
                             f"get_config(); got {name_or_path!r}{missing}")
        spec = importlib.util.spec_from_file_location(f"twomamba_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    config = module.get_config()
    if not isinstance(config, TrainConfig):
        raise ValueError(f"--config: get_config() of {name_or_path!r} must return a TrainConfig; got {type(config)}")
    return config


def _parse(text: str, kind, key: str):
    """A string as the field's type (int, float, bool, str, or one of those | None)."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return _parse(text, options[0], key)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return kind(text)
    except ValueError:
        raise ValueError(f"--config.{key}: expected a {kind.__name__}; got {text!r}") from None


def override(config, key: str, text: str):
    """A copy of ``config`` with the dotted ``key`` (e.g. ``model.mixer``) set from ``text``."""
    return _override(config, key.split("."), key, text)


def _override(config, path: list[str], key: str, text: str):
    """Sets ``path`` within ``config``; errors name the whole ``key``, so a nested key keeps its section."""
    head, rest = path[0], path[1:]
    fields = {field.name: field for field in dataclasses.fields(config)}
    if head not in fields:
        raise ValueError(f"--config.{key}: unknown key {head!r} in {type(config).__name__}; expected one of "
                         f"{sorted(fields)}")
    hints = typing.get_type_hints(type(config))
    current = getattr(config, head)
    if dataclasses.is_dataclass(current):
        if not rest:
            raise ValueError(f"--config.{key}: {head} is a section; set one of its keys, e.g. "
                             f"--config.{key}.{dataclasses.fields(current)[0].name}=...")
        return dataclasses.replace(config, **{head: _override(current, rest, key, text)})
    if rest:
        raise ValueError(f"--config.{key}: {head} is not a section")
    return dataclasses.replace(config, **{head: _parse(text, hints[head], key)})


def check(config: TrainConfig) -> None:
    """What the command line checks at once, before any data is read: the mixer's name (the presets' own error
    would name their argument, ``name``, rather than the config key)."""
    from twomamba_jax import presets  # imports jax: kept out of --help

    mixer = config.model.mixer
    if mixer not in presets.MIXER_PRESETS and mixer not in presets.PAPER_CONFIGS:
        raise ValueError(f"model.mixer: expected a preset {sorted(presets.MIXER_PRESETS)} or one of the "
                         f"{len(presets.PAPER_CONFIGS)} paper config names (twomamba_jax.presets.PAPER_CONFIGS, "
                         f"listed in the README); got {mixer!r}")


def describe(config, prefix: str = "") -> list[str]:
    """One line per field: ``--config.key=default  help``, for ``--help``."""
    lines = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            lines += describe(value, f"{prefix}{field.name}.")
        else:
            lines.append(f"  --config.{prefix}{field.name}={value}".ljust(44) + f" {field.metadata.get('help', '')}")
    return lines


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
