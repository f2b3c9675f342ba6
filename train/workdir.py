"""Training work directories: ``path`` (any ``etils.epath`` location: a local directory or ``gs://bucket/...``) and
``load``, a work directory read back for use: its config, the model with the newest checkpoint's parameters, and
the tokenizer of its data."""

from __future__ import annotations

import dataclasses
import json
import os
import typing

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from twomamba_jax import nn
from twomamba_jax.train import config as train_config
from twomamba_jax.train import synthetic
from twomamba_jax.train.tokenizers import make_tokenizer


@dataclasses.dataclass
class Trained:
    config: train_config.TrainConfig
    model: nn.LanguageModel
    step: int
    tokenizer: object | None  # None for the synthetic tasks (their inputs are token ids)


def path(location: str | os.PathLike) -> epath.Path:
    """A work directory (or a file in one) as an ``epath.Path``: local paths made absolute, URIs (``gs://``,
    ``s3://``) as they are. Everything the trainer writes goes through it, never bare ``open`` or ``pathlib``."""
    location = os.fspath(location)
    return epath.Path(location if is_remote(location) else os.path.abspath(location))


def is_remote(location: str | os.PathLike) -> bool:
    """Whether a location is an object store (``scheme://``), where files cannot be appended to or renamed
    atomically."""
    return "://" in os.fspath(location)


def load(workdir: str | os.PathLike) -> Trained:
    """The newest checkpoint of a ``twomamba-train`` work directory, on the default device; a directory that is
    not one, or holds no checkpoint, is a ValueError saying so."""
    from twomamba_jax.train.trainer import model_config  # the trainer's own mapping from config to model

    workdir = path(workdir)
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"workdir: {str(workdir)!r} has no config.json (expected a twomamba-train work directory)")
    config = from_dict(train_config.TrainConfig, json.loads(config_file.read_text()))
    checkpoints = workdir / "checkpoints"
    if not checkpoints.is_dir():
        raise _no_checkpoint(workdir)
    with ocp.CheckpointManager(checkpoints) as manager:
        step = manager.latest_step()
        if step is None:
            raise _no_checkpoint(workdir)
        tokenizer = None if config.data.source in synthetic.TASKS else make_tokenizer(config.data.tokenizer)
        vocab_size = config.data.vocab_size if tokenizer is None else tokenizer.vocab_size
        model_cfg = dataclasses.replace(model_config(config, vocab_size), remat=False, remat_policy="full")
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: nn.LanguageModel(model_cfg, rngs=nnx.Rngs(0))),
                                       nnx.Param)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        # Only the parameters: the optimizer state (twice their size) stays on disk.
        item = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                       nnx.to_pure_dict(abstract))}
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
    nnx.replace_by_pure_dict(abstract, restored["state"]["params"])
    return Trained(config=config, model=nnx.merge(graphdef, abstract), step=step, tokenizer=tokenizer)


def _no_checkpoint(workdir: epath.Path) -> ValueError:
    return ValueError(f"workdir: {str(workdir)!r} holds no checkpoint yet (train first: twomamba-train "
                      f"--workdir {workdir})")


def from_dict(kind, values: dict):
    """A config dataclass from ``dataclasses.asdict`` output (config.json), nested sections included."""
    hints = typing.get_type_hints(kind)
    fields = {}
    for field in dataclasses.fields(kind):
        if field.name in values:
            value = values[field.name]
            fields[field.name] = from_dict(hints[field.name], value) if dataclasses.is_dataclass(
                hints[field.name]) else value
    return kind(**fields)
