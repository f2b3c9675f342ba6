"""Sharded training on 8 virtual CPU devices: one step on every mesh gives the unsharded loss and parameters, and
parameters carry the PartitionSpecs of the logical-axis rules. Tolerance 1e-5 relative (float32; the meshes
only reorder the sums of the all-reduces). Adam's epsilon is raised to 1e-3 here: its first step divides each
gradient by its own magnitude, which turns a 1e-7 reordering difference in a near-zero gradient into a full
+-lr step; with epsilon above those gradients the update stays proportional to them."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from twomamba_jax.train.config import (DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig)
from twomamba_jax.train.trainer import setup

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]


def _config(mixer, mesh=(1, 1, 1), **data):
    return TrainConfig(
        steps=10,
        model=ModelConfig(size="tiny", mixer=mixer, model_dim=64, num_layers=1, num_heads=8, head_dim=16,
                          mlp_dim=128),
        data=DataConfig(source="mqar", seq_len=32, batch_size=16, vocab_size=64, num_kv_pairs=4, **data),
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=0, accumulate=2, eps=1e-3),
        mesh=MeshConfig(*mesh),
    )


def _one_step(config, devices=None):
    run = setup(config, devices=devices)
    state = run.init_state()
    with jax.set_mesh(run.mesh):
        new_state, metrics = run.train_step()(state, run.global_batch(next(run.dataset.train_iterator())))
    return run, jax.device_get(new_state["params"]), float(metrics["loss"]), new_state


@pytest.mark.parametrize("mixer", ["2mamba", "softmax", "mamba2"])
def test_one_step_matches_unsharded_on_every_mesh(mixer):
    assert jax.device_count() == 8
    _, expected_params, expected_loss, _ = _one_step(_config(mixer), devices=jax.devices()[:1])
    for mesh in MESHES:
        if mixer == "mamba2" and mesh[2] > 1:
            continue  # tensor parallelism of Mamba-2: its heads follow expand * M / head_dim (see below)
        if mixer == "2mamba" and mesh != (2, 2, 2):
            continue  # the slowest to compile on CPU (~35 s a mesh): all three axes at once; softmax takes all four
        _, params, loss, _ = _one_step(_config(mixer, mesh))
        assert abs(loss - expected_loss) <= 1e-5 * abs(expected_loss), mesh
        for path, got, want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(params),
                                   jax.tree.leaves(expected_params)):
            error = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
            assert error < 1e-5, (mesh, jax.tree_util.keystr(path[0]))


def test_mamba2_under_tensor_parallelism_matches_unsharded():
    # Mamba-2 tiny at M=64, expand 2, head_dim 64 has 2 heads: tensor=2 splits them.
    config = dataclasses.replace(_config("mamba2"), mesh=MeshConfig(data=4, fsdp=1, tensor=2))
    _, expected_params, expected_loss, _ = _one_step(_config("mamba2"), devices=jax.devices()[:1])
    _, params, loss, _ = _one_step(config)
    assert abs(loss - expected_loss) <= 1e-5 * abs(expected_loss)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected_params)):
        assert np.linalg.norm(got - want) <= 1e-5 * max(np.linalg.norm(want), 1e-30)


def test_parameters_carry_the_partition_specs_of_the_rules():
    run, _, _, state = _one_step(_config("2mamba", (2, 2, 2)))
    params = state["params"]
    block = params["blocks"][0]
    expected = {
        "embed": (params["embed"], P("tensor", "fsdp")),
        "lm_head": (params["lm_head"], P("fsdp", "tensor")),
        "qkv": (block["mixer"]["qkv"], P("fsdp", None, "tensor", None)),
        "out": (block["mixer"]["out"], P("tensor", None, "fsdp")),
        "mlp.gate": (block["mlp"]["gate"], P("fsdp", "tensor")),
        "mlp.down": (block["mlp"]["down"], P("tensor", "fsdp")),
        "mixer_norm": (block["mixer_norm"]["scale"], P("fsdp")),
    }
    for name, (array, spec) in expected.items():
        assert array.sharding.spec == spec, name
    # The optimizer's moments are sharded like their parameters.
    moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt_state"])
               if jax.tree_util.keystr(path).endswith("['embed']")]  # Adam's mu and nu
    assert len(moments) == 2 and all(m.sharding.spec == P("tensor", "fsdp") for m in moments)


@pytest.mark.parametrize("mesh,message", [
    ((3, 1, 1), "uses 3 devices; expected all 8"),
    ((-1, 3, 1), "do not divide the 8 devices"),
    ((1, 1, 8), "mesh.tensor: 8 does not divide the model's num_heads=4"),
    ((8, 1, 1), "data.batch_size: 4 is not divisible by mesh.data x mesh.fsdp = 8"),
])
def test_bad_meshes_fail_before_compiling(mesh, message):
    config = _config("2mamba", mesh)
    model = dataclasses.replace(config.model, num_heads=4)
    data = dataclasses.replace(config.data, batch_size=8)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        setup(dataclasses.replace(config, model=model, data=data))
