"""Remat policies: "save_attention" keeps the attention kernels' outputs, so the backward of a rematerialized block
runs none of their forwards again, and gives the same gradients as recomputing the whole block."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from twomamba_jax import nn, ops, presets
from twomamba_jax.kernels.chunked import chunked_attention_pallas
from helpers import all_equations, tree_rel_error

# The forward kernel of each impl (by kernel name), which the backward runs again under full remat.
FORWARD_KERNELS = {"pallas_chunked": "twomamba_chunk_outputs", "pallas_parallel": "twomamba_parallel_forward"}


def kernel_counts(jaxpr) -> collections.Counter:
    """How many times each Pallas kernel (by name) is called in ``jaxpr`` and the jaxprs inside it (Mosaic GPU
    kernels are ``mpmd_map`` calls)."""
    return collections.Counter(eqn.params["name"] for eqn in all_equations(jaxpr)
                               if eqn.primitive.name in ("pallas_call", "mpmd_map"))


def _model(impl, remat, policy="full"):
    config = nn.ModelConfig(vocab_size=32, model_dim=32, num_layers=1, num_heads=2, head_dim=16, mlp_dim=64,
                            mixer=presets.mixer_config("2mamba", impl=impl), remat=remat, remat_policy=policy)
    return nn.LanguageModel(config, rngs=nnx.Rngs(0))


def _loss(model, tokens):
    return jnp.mean(jax.nn.log_softmax(model(tokens))[..., 0])


@pytest.mark.parametrize("impl", list(FORWARD_KERNELS))
def test_save_attention_runs_the_forward_kernel_once(impl):
    tokens = jnp.zeros((1, 128), jnp.int32)
    counts = {}
    for policy in ("full", "save_attention"):
        model = _model(impl, True, policy)
        counts[policy] = kernel_counts(jax.make_jaxpr(lambda m: nnx.grad(_loss)(m, tokens))(model).jaxpr)
    forward = FORWARD_KERNELS[impl]
    assert counts["full"][forward] == 2 and counts["save_attention"][forward] == 1, counts
    backward = {name: n for name, n in counts["full"].items() if "grad" in name or name.endswith(("_dq", "_dkv"))}
    assert backward and all(counts["save_attention"][name] == n for name, n in backward.items()), counts


def test_hopper_forward_kernels_run_once_under_either_policy():
    """The Hopper chunked kernels, traced as for a GPU (their interpreter's callbacks are effects remat refuses):
    the forward's kernels write y through a ref, an effect, and remat keeps the outputs of effectful operations,
    so on Hopper even "full" remat runs them once (the backward's kernels once too)."""
    x = jnp.ones((1, 128, 2, 64), jnp.bfloat16)

    def block(x):
        y = chunked_attention_pallas(jnp.tanh(x), x, x, None, power=2, normalize="softmax", scale=0.125,
                                     chunk_size=64, backend="mosaic_gpu", interpret=False)
        return jnp.sin(y.astype(jnp.float32))  # whose backward reads y

    for policy in (None, ops.remat.save_attention):
        loss = lambda x: jnp.sum(jax.checkpoint(block, policy=policy)(x))
        counts = kernel_counts(jax.make_jaxpr(jax.grad(loss))(x).jaxpr)
        assert set(counts.values()) == {1} and len(counts) == 6, counts


@pytest.mark.parametrize("impl", list(FORWARD_KERNELS))
def test_save_attention_gives_the_gradients_of_full_remat(impl):
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 96)), jnp.int32)
    grads = {}
    for remat, policy in ((False, "full"), (True, "full"), (True, "save_attention")):
        model = _model(impl, remat, policy)
        grads[remat, policy] = nnx.state(nnx.grad(_loss)(model, tokens))
    assert tree_rel_error(grads[True, "save_attention"], grads[False, "full"]) < 1e-5
    assert tree_rel_error(grads[True, "full"], grads[False, "full"]) < 1e-5


def test_cudnn_forward_primitive_name():
    """The policy keeps cuDNN's forward by its primitive's name, which must be jax's."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    assert cudnn._dot_product_attention_fwd_p_wrapper.name == ops.remat.CUDNN_ATTENTION_FORWARD


def test_bad_remat_policy():
    common = dict(vocab_size=32, model_dim=32, num_layers=1, num_heads=2, head_dim=16, mlp_dim=64)
    with pytest.raises(ValueError, match="remat_policy: expected one of \\('full', 'save_attention'\\); got 'some'"):
        nn.ModelConfig(remat=True, remat_policy="some", **common)
    with pytest.raises(ValueError, match="remat_policy: 'save_attention' applies only with remat=True"):
        nn.ModelConfig(remat_policy="save_attention", **common)
