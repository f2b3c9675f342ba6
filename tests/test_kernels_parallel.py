"""The flash-style Pallas kernels (interpret mode on CPU) against the float64 oracle, values and gradients of q, k,
v and the log-decay, and their GPU and TPU lowering.

Tolerances: outputs float32 1e-5 relative, bfloat16 1e-2; float32 gradients 5e-5, since dq and dk are sums over
every key (query) of ``dW = dy . v - dy . y`` terms that cancel (about 10-30x the rounding of the output; 3.2e-5
seen for normalized power 2 without decay, d = 64), bfloat16 gradients 1e-2. N = 37 is not a multiple of the
block (16 here), and keys are grouped (GQA: 4 query heads over 2 key heads) unless a case names 4 key heads.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_error

from twomamba_jax import ops
from twomamba_jax.kernels.parallel import parallel_attention_pallas, unsupported_reason

TOLERANCES = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
GRADIENT_TOLERANCES = {jnp.float32: 5e-5, jnp.bfloat16: 1e-2}
VARIANTS = [(p, n) for p in (1, 2, "exp") for n in ("softmax", None)]
CASES = [(32, jnp.float32, p, n, True) for p, n in VARIANTS]
CASES += [(dim, dtype, p, "softmax", True) for dim in (64, 128) for dtype in (jnp.float32, jnp.bfloat16)
          for p in (2, "exp")]
CASES += [(64, jnp.float32, 2, "softmax", False), (64, jnp.bfloat16, 1, None, False)]
CASES = [("triton", *case) for case in CASES]
# The TPU kernels in the TPU interpreter (slower; it reads uninitialized VMEM as NaN): every variant at d = 32,
# both dtypes at d = 128.
CASES += [("tpu", 32, jnp.float32, p, n, True) for p, n in VARIANTS]
CASES += [("tpu", 128, dtype, p, "softmax", True) for dtype in (jnp.float32, jnp.bfloat16) for p in (2, "exp")]
CASES = [(*case, 2) for case in CASES]  # the last field: key heads (of 4 query heads)
# The Hopper (Mosaic GPU) kernels in the Mosaic GPU interpreter (bfloat16, head dims multiples of 64, 128-token
# programs and decay blocks, 128- and 64-token tiles: N = 130 gives two programs, diagonal and off-diagonal tiles
# and a ragged end), forward and backward: every power, normalized and not, grouped keys (dk and dv summed in float32
# after the kernel) and not (written by the kernel in bfloat16), with and without decay, at d 64 (the powers' one
# backward kernel) and 128 (their two-pass backward, as exp's). The interpreter takes ~30 s a case.
CASES += [("mosaic_gpu", 64, jnp.bfloat16, p, n, True, kv) for p, n, kv in (
    (2, "softmax", 2), (2, None, 4), ("exp", "softmax", 2), ("exp", None, 4), (1, None, 2))]
CASES += [("mosaic_gpu", 128, jnp.bfloat16, p, n, d, kv) for p, n, d, kv in (
    (2, "softmax", True, 2), ("exp", None, True, 4), (1, None, False, 4))]
BLOCKS = {"triton": 16, "tpu": 16, "mosaic_gpu": 128}
LENGTHS = {"triton": 37, "tpu": 37, "mosaic_gpu": 130}


def _inputs(rng, dim, dtype, power, normalize, decay, heads=4, kv_heads=2, length=37):
    def normal(*shape):
        return rng.standard_normal(shape)

    q, k, v = normal(1, length, heads, dim), normal(1, length, kv_heads, dim), normal(1, length, kv_heads, dim)
    if power == 1 and normalize:  # normalized power 1 needs non-negative weights
        q, k = np.abs(q), np.abs(k)
    log_decay = -np.log1p(np.exp(normal(1, length, heads) - 2.0)) if decay else None
    cast = lambda x: None if x is None else jnp.asarray(x, dtype)
    return cast(q), cast(k), cast(v), None if log_decay is None else jnp.asarray(log_decay, jnp.float32)


@pytest.mark.parametrize("backend,dim,dtype,power,normalize,decay,kv_heads", CASES)
def test_values_and_gradients_match_the_oracle(rng, backend, dim, dtype, power, normalize, decay, kv_heads):
    q, k, v, a = _inputs(rng, dim, dtype, power, normalize, decay, kv_heads=kv_heads, length=LENGTHS[backend])
    group = q.shape[2] // k.shape[2]
    cotangent = jnp.asarray(rng.standard_normal(q.shape[:3] + (v.shape[-1],)))
    scale = 1 / np.sqrt(dim)

    def loss(fn, *args):
        return jnp.sum(fn(*args).astype(jnp.float64) * cotangent)

    def oracle(q, k, v, a):
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        return ops.decayed_attention(q, k, v, a, power=power, normalize=normalize, impl="reference")

    def kernel(q, k, v, a):
        return parallel_attention_pallas(q, k, v, a, power=power, normalize=normalize, scale=scale,
                                         block_size=BLOCKS[backend], backend=backend, interpret=True)

    argnums = (0, 1, 2, 3) if decay else (0, 1, 2)
    upcast = lambda x: None if x is None else x.astype(jnp.float64)
    expected = jax.value_and_grad(functools.partial(loss, oracle), argnums)(*map(upcast, (q, k, v, a)))
    got = jax.value_and_grad(functools.partial(loss, kernel), argnums)(q, k, v, a)
    tol = TOLERANCES[dtype]
    y = kernel(q, k, v, a)
    assert y.dtype == dtype and rel_error(y, oracle(*map(upcast, (q, k, v, a)))) < tol
    for name, g, e in zip(("q", "k", "v", "log_decay"), got[1], expected[1]):
        assert g.dtype == (jnp.float32 if name == "log_decay" else dtype), name
        assert rel_error(g, e) < GRADIENT_TOLERANCES[dtype], name


def test_decayed_attention_dispatches_and_falls_back(rng, caplog):
    from twomamba_jax.ops import api

    q, k, v, a = _inputs(rng, 32, jnp.float32, "exp", "softmax", True, heads=2, kv_heads=2, length=20)
    expected = ops.decayed_attention(q, k, v, a, power="exp", normalize="softmax", impl="reference")
    for impl in ("pallas_parallel", "pallas"):  # "pallas" takes the flash-style kernel for exp
        got = ops.decayed_attention(q, k, v, a, power="exp", normalize="softmax", impl=impl)
        assert rel_error(got, expected) < 1e-5, impl
    api._log_fallback.cache_clear()
    with caplog.at_level(logging.WARNING):
        y, cache = ops.decayed_attention(q, k, v, a, power="exp", normalize="softmax", impl="pallas_parallel",
                                         return_state=True)
    assert rel_error(y, expected) < 1e-5 and isinstance(cache, ops.KVCache)
    assert ("decayed_attention: impl='pallas_parallel' cannot use the flash-style kernels for a state in or out "
            "(initial_state / return_state); using impl='reference'") in [r.getMessage() for r in caplog.records]
    with pytest.raises(ValueError, match='power="exp" has no finite state'):
        ops.decayed_attention(q, k, v, a, power="exp", normalize="softmax", impl="pallas_chunked")
    assert "dk=12" in unsupported_reason(q[..., :12], k[..., :12], v, power=2)
    with pytest.raises(ValueError, match="k, v: expected a head count dividing q's 2"):
        parallel_attention_pallas(q, jnp.concatenate([k] * 3, 2), jnp.concatenate([v] * 3, 2), a, power=2,
                                  normalize=None, scale=0.1)


@pytest.mark.parametrize("power,normalize", [(2, "softmax"), ("exp", "softmax"), (1, None)])
def test_kernels_lower_for_the_gpu_on_cpu(power, normalize):
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    queries, keys = jax.ShapeDtypeStruct((1, 200, 4, 64), jnp.bfloat16), jax.ShapeDtypeStruct((1, 200, 2, 64),
                                                                                                jnp.bfloat16)
    decay = jax.ShapeDtypeStruct((1, 200, 4), jnp.float32)

    def loss(q, k, v, a):
        return jnp.sum(parallel_attention_pallas(q, k, v, a, power=power, normalize=normalize,
                                                 scale=0.125).astype(jnp.float32))

    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).trace(
            queries, keys, keys, decay).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    for kernel in ("forward", "dq", "dkv"):
        assert f"twomamba_parallel_{kernel}" in text, kernel


@pytest.mark.parametrize("power,normalize", [(2, "softmax"), ("exp", "softmax"), (1, None)])
def test_tpu_kernels_lower_to_mosaic_on_cpu(power, normalize):
    queries, keys = jax.ShapeDtypeStruct((1, 300, 4, 64), jnp.bfloat16), jax.ShapeDtypeStruct((1, 300, 2, 64),
                                                                                                jnp.bfloat16)
    decay = jax.ShapeDtypeStruct((1, 300, 4), jnp.float32)

    def loss(q, k, v, a):
        return jnp.sum(parallel_attention_pallas(q, k, v, a, power=power, normalize=normalize, scale=0.125,
                                                 backend="tpu").astype(jnp.float32))

    # Some lowering rules ask for the chip's generation: name one (a v5e) through an abstract TPU device.
    device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).trace(
            queries, keys, keys, decay).lower(lowering_platforms=("tpu",))
    text = lowered.as_text()
    assert text.count("tpu_custom_call") == 3  # forward (its output and statistic are the residuals), dq, dkv
    for kernel in ("forward", "dq", "dkv"):
        assert f"twomamba_parallel_{kernel}" in text, kernel


@pytest.mark.parametrize("power,dim,kernels", [(2, 64, ("forward", "backward")), ("exp", 64, ("forward", "dq", "dkv")),
                                              (2, 128, ("forward", "dq", "dkv"))])
def test_hopper_kernels_take_token_major_arrays_without_transposes(power, dim, kernels):
    """Lowered for an H200 on CPU, forward + backward of the Mosaic GPU path calls its kernels (one backward kernel
    for powers at d = 64, two for exp and at d = 128) and transposes only per-token (B, N, H) vectors, never a
    (B, N, H, d) array: the kernels read the model's layout."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    queries, keys = jax.ShapeDtypeStruct((2, 256, 4, dim), jnp.bfloat16), jax.ShapeDtypeStruct((2, 256, 2, dim),
                                                                                                 jnp.bfloat16)

    def loss(q, k, v, a):
        return jnp.sum(parallel_attention_pallas(q, k, v, a, power=power, normalize="softmax", scale=0.125,
                                                 backend="mosaic_gpu").astype(jnp.float32))

    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).trace(
            queries, keys, keys, jax.ShapeDtypeStruct((2, 256, 4), jnp.float32)).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    for kernel in kernels:
        assert f"twomamba_mosaic_{kernel}" in text, kernel
    transposes = [line for line in text.splitlines() if "stablehlo.transpose" in line]
    assert transposes and all("tensor<2x256x4xf32>" in line for line in transposes), transposes
    with pytest.raises(ValueError, match="block_size: the Mosaic GPU kernels take 128-token decay blocks; got 64"):
        parallel_attention_pallas(jnp.zeros((1, 8, 2, 64), jnp.bfloat16), *[jnp.zeros((1, 8, 2, 64), jnp.bfloat16)] * 2,
                                  power=2, normalize=None, scale=0.1, block_size=64, backend="mosaic_gpu")


@pytest.mark.parametrize("power,normalize", [(2, "softmax"), ("exp", None)])
def test_hopper_kernels_reuse_their_ring_slots(rng, power, normalize):
    """N = 300: three 128-row programs, the longest walking three 128-token tiles through a ring of two slots (the
    diagonal's unscaled keys or queries and the folded ones share the slots), against the float64 oracle: values
    and gradients."""
    q, k, v, a = _inputs(rng, 64, jnp.bfloat16, power, normalize, True, length=300)
    a = a / 50  # ~-0.3 a 128-token block, so that keys two blocks back still weigh
    cotangent = jnp.asarray(rng.standard_normal(q.shape))

    def loss(attention, q, k, v, a):
        y = attention(q, k, v, a)
        return jnp.sum(y.astype(jnp.float64) * cotangent), y

    def oracle(q, k, v, a):
        k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        return ops.decayed_attention(q, k, v, a, power=power, normalize=normalize, scale=0.125, impl="reference")

    kernel = functools.partial(parallel_attention_pallas, power=power, normalize=normalize, scale=0.125,
                               backend="mosaic_gpu", interpret=True)
    grad = jax.grad(loss, argnums=(1, 2, 3, 4), has_aux=True)
    got, y = grad(kernel, q, k, v, a)
    expected, y_expected = grad(oracle, *(x.astype(jnp.float64) for x in (q, k, v, a)))
    assert rel_error(y, y_expected) < TOLERANCES[jnp.bfloat16]
    for name, g, e in zip(("q", "k", "v", "log_decay"), got, expected):
        assert rel_error(g, e) < GRADIENT_TOLERANCES[jnp.bfloat16], name


@pytest.mark.parametrize("dim,dtype,expected", [(64, jnp.bfloat16, "mosaic_gpu"), (128, jnp.bfloat16, "mosaic_gpu"),
                                                (32, jnp.bfloat16, "triton"), (64, jnp.float32, "triton")])
def test_hopper_gpus_take_the_mosaic_gpu_kernels(monkeypatch, dim, dtype, expected):
    from twomamba_jax.ops import api

    q = k = v = jnp.zeros((1, 8, 2, dim), dtype)
    monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(api, "_has_wgmma", lambda: True)
    assert api._kernel("parallel", q, k, v, power=2, requested="pallas").keywords["backend"] == expected
    monkeypatch.setattr(api, "_has_wgmma", lambda: False)  # e.g. an A100: no wgmma
    assert api._kernel("parallel", q, k, v, power=2, requested="pallas").keywords["backend"] == "triton"
