"""The chunked Pallas kernels (interpret mode on CPU) against the float64 oracle, and their GPU and TPU lowering.

Tolerances: float32 inputs 1e-5 relative (float32 accumulation over a few chunks; interpret mode computes in
float32 like the GPU with IEEE dots); bfloat16 inputs 1e-2 (operands rounded to 8 bits, float32 accumulation).
Gradients run through the backward kernels (states recomputed, state cotangents in reverse, per-chunk grads).
The GPU (Triton) kernels run through ``decayed_attention(impl="pallas_chunked")``, which picks them on CPU; the
TPU (Mosaic) kernels run in the TPU interpreter, which fills uninitialized VMEM with NaN, on a subset of the
cases (it is slower): every head dim and dtype for the two main variants, the others at d = 64. The Hopper
kernels (Mosaic GPU, power 2, d = 64, bfloat16, 64-token chunks) run in the Mosaic GPU interpreter (~30 s a case,
forward and backward) at N = 130 (three chunks, the last ragged), and are lowered for an H200 on CPU (Mosaic GPU's
own layout inference and wgmma / TMA checks).
"""

import functools
import math

import jax
import jax.numpy as jnp
import pytest
from helpers import random_qkv, rel_error, tree_rel_error

from twomamba_jax import ops
from twomamba_jax.kernels.chunked import chunked_attention_pallas, unsupported_reason
from twomamba_jax.kernels.chunked import mosaic_gpu as hopper
from twomamba_jax.kernels.chunked import mosaic_gpu_backward as hopper_backward
from twomamba_jax.ops.numerics import KERNEL_DOCUMENT_START, with_document_starts

TOLERANCES = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _pallas(q, k, v, a, **kw):
    return ops.decayed_attention(q, k, v, a, impl="pallas_chunked", chunk_size=16, **kw)


def _tpu_pallas(q, k, v, a, **kw):
    return chunked_attention_pallas(q, k, v, a, scale=1 / math.sqrt(q.shape[-1]), chunk_size=16, backend="tpu",
                                    interpret=True, **kw)


def _hopper_pallas(q, k, v, a, **kw):
    return chunked_attention_pallas(q, k, v, a, scale=1 / math.sqrt(q.shape[-1]), chunk_size=64,
                                    backend="mosaic_gpu", interpret=True, **kw)


KERNELS = {"triton": _pallas, "tpu": _tpu_pallas, "mosaic_gpu": _hopper_pallas}
VARIANTS = [(2, "softmax", True), (2, None, False), (1, None, True), (1, "softmax", False)]
CASES = [("triton", dim, dtype, *variant) for dim in (32, 64, 128) for dtype in (jnp.float32, jnp.bfloat16)
         for variant in VARIANTS]
CASES += [("tpu", dim, dtype, *variant) for dim in (32, 64, 128) for dtype in (jnp.float32, jnp.bfloat16)
          for variant in VARIANTS if dim == 64 or variant in (VARIANTS[0], VARIANTS[2])]
CASES += [pytest.param("mosaic_gpu", 64, jnp.bfloat16, *variant, marks=pytest.mark.slow)
          for variant in (*VARIANTS[:2], (1, None, True), (1, None, False))]


@pytest.mark.parametrize("backend,dim,dtype,power,normalize,decay", CASES)
def test_values_states_and_gradients_match_the_oracle(rng, monkeypatch, backend, dim, dtype, power, normalize,
                                                     decay):
    length, value_dim = (130, dim) if backend == "mosaic_gpu" else (37, dim // 2)
    if backend == "mosaic_gpu" and decay:  # the log-decay's cotangent in segments of 2 chunks (the last one short):
        # segments of 1 would keep 2 checkpoints, more than the budget lets, so they double
        monkeypatch.setattr(hopper_backward, "CHECKPOINT", 1)
        monkeypatch.setattr(hopper_backward, "CHECKPOINT_BYTES", 3 * hopper_backward.CHECKPOINT_BYTES_PER_HEAD)
        assert hopper_backward.checkpoint_interval(2, 3) == 2
        # and the single-state walks in parts started by the two-level scan: power 2 in 3 parts of one chunk,
        # power 1 in 2 parts of 2 chunks (4 programs: the 3 chunks padded to 4)
        monkeypatch.setattr(hopper, "MIN_PART_CHUNKS", 1)
        if power == 1:
            monkeypatch.setattr(hopper, "PROGRAMS", 4)
        assert hopper.walk_parts(2, 3) == (2 if power == 1 else 3)
    q, k, v, a = random_qkv(rng, batch=1, length=length, heads=2, key_dim=dim, value_dim=value_dim, dtype=dtype,
                            decay=decay, non_negative=(power == 1 and normalize == "softmax"))
    a = None if a is None else a.astype(jnp.float32)
    prefix = random_qkv(rng, batch=1, length=5, heads=2, key_dim=dim, value_dim=value_dim,
                        non_negative=(power == 1 and normalize == "softmax"))
    _, state0 = ops.decayed_attention(*prefix, power=power, normalize=normalize, return_state=True)
    state0 = jax.tree.map(lambda s: s.astype(jnp.float32), state0)
    kw = dict(power=power, normalize=normalize, initial_state=state0, return_state=True)
    cotangent = jnp.asarray(rng.standard_normal(v.shape))

    def loss(fn, q, k, v, a, state):
        y, s = fn(q, k, v, a, **{**kw, "initial_state": state})
        state_term = sum(jnp.sum(leaf.astype(jnp.float64)) for leaf in jax.tree.leaves(s))  # numerator, normalizer
        return jnp.sum(y.astype(jnp.float64) * cotangent) + state_term, (y, s)

    argnums = (0, 1, 2, 3, 4) if decay else (0, 1, 2, 4)
    upcast = lambda x: None if x is None else x.astype(jnp.float64)
    oracle = lambda q, k, v, a, **o: ops.decayed_attention(q, k, v, a, impl="reference", **o)
    (_, (y_ref, s_ref)), g_ref = jax.value_and_grad(functools.partial(loss, oracle), argnums, has_aux=True)(
        upcast(q), upcast(k), upcast(v), upcast(a), jax.tree.map(upcast, state0))
    kernel = KERNELS[backend]
    (_, (y, s)), g = jax.value_and_grad(functools.partial(loss, kernel), argnums, has_aux=True)(q, k, v, a, state0)

    tol = TOLERANCES[dtype]
    assert y.dtype == dtype and rel_error(y, y_ref) < tol
    assert tree_rel_error(s, s_ref) < tol
    for name, got, expected in zip(("q", "k", "v", "log_decay", "state")[: len(argnums)], g, g_ref):
        assert tree_rel_error(got, expected) < tol, name


@pytest.mark.parametrize("backend", ["triton", "tpu"])
@pytest.mark.parametrize("key_dim,value_dim,chunk_size,length", [(16, 32, 32, 64), (16, 16, 64, 20),
                                                                  (32, 64, 128, 130)])
def test_other_shapes_without_state(rng, backend, key_dim, value_dim, chunk_size, length):
    """Padded features (dk=16), dv > dk, N a multiple of the chunk, N below one chunk; no state in or out."""
    q, k, v, a = random_qkv(rng, batch=2, length=length, heads=1, key_dim=key_dim, value_dim=value_dim,
                            dtype=jnp.float32)
    a = a.astype(jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
    kw = dict(power=2, normalize="softmax", chunk_size=chunk_size)

    def loss(fn, *args):
        return jnp.sum(fn(*args, **kw).astype(jnp.float64) * cotangent)

    def kernel(*args, chunk_size, **kw):
        return chunked_attention_pallas(*args, scale=1 / math.sqrt(key_dim), chunk_size=chunk_size,
                                        backend=backend, interpret=True, **kw)

    args = (q, k, v, a)
    oracle = functools.partial(ops.decayed_attention, impl="reference")
    expected = jax.value_and_grad(functools.partial(loss, oracle), (0, 1, 2, 3))(
        *(x.astype(jnp.float64) for x in args))
    got = jax.value_and_grad(functools.partial(loss, kernel), (0, 1, 2, 3))(*args)
    assert rel_error(got[0], expected[0]) < 1e-5
    for name, g, e in zip("q k v log_decay".split(), got[1], expected[1]):
        assert rel_error(g, e) < 1e-5, name


def test_unsupported_inputs_fall_back_with_one_log_line(rng, caplog):
    from twomamba_jax.ops import api

    q, k, v, a = random_qkv(rng, batch=1, length=9, heads=1, key_dim=12, value_dim=12, dtype=jnp.float32)
    assert "dk=12" in unsupported_reason(q, k, v, power=2, chunk_size=16)
    q16, k16, v16, _ = random_qkv(rng, batch=1, length=9, heads=1, key_dim=16, value_dim=16, dtype=jnp.bfloat16)
    assert unsupported_reason(q16, k16, v16, power=2, chunk_size=16) is None
    assert "dtypes" in unsupported_reason(q16, k16.astype(jnp.float32), v16, power=2, chunk_size=16)
    assert "dtypes" in unsupported_reason(*(x.astype(jnp.float16) for x in (q16, k16, v16)), power=2, chunk_size=16)
    api._log_fallback.cache_clear()
    with caplog.at_level("WARNING"):
        y = _pallas(q, k, v, a, power=2, normalize="softmax")
        _pallas(q, k, v, a, power=2, normalize="softmax")
    assert [r.getMessage() for r in caplog.records].count(
        "decayed_attention: impl='pallas_chunked' cannot use the Pallas kernels for dk=12 (expected one of "
        "(16, 32, 64, 128)); using impl='chunked'") == 1
    expected = ops.decayed_attention(q, k, v, a, power=2, normalize="softmax", impl="reference")
    assert rel_error(y, expected) < 1e-5


def test_kernels_lower_for_the_gpu_on_cpu():
    """Pallas -> Triton lowering for an H200, without a GPU (an abstract CUDA device)."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    tokens = jax.ShapeDtypeStruct((1, 200, 2, 64), jnp.bfloat16)
    decay = jax.ShapeDtypeStruct((1, 200, 2), jnp.float32)

    def loss(q, k, v, a):
        return jnp.sum(chunked_attention_pallas(q, k, v, a, power=2, normalize="softmax", scale=0.125,
                                                chunk_size=64).astype(jnp.float32))

    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).trace(
            tokens, tokens, tokens, decay).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    for kernel in ("chunk_states", "chunk_outputs", "chunk_state_grads", "chunk_grads"):
        assert f"twomamba_{kernel}" in text, kernel


def test_unknown_backend_is_refused(rng):
    q, k, v, a = random_qkv(rng, batch=1, length=9, heads=1, key_dim=16, value_dim=16, dtype=jnp.float32)
    with pytest.raises(ValueError, match="backend: expected one of \\('triton', 'tpu', 'mosaic_gpu'\\); got 'cuda'"):
        chunked_attention_pallas(q, k, v, a, power=2, normalize=None, scale=0.25, chunk_size=16, backend="cuda")
    for (dim, dtype, power, chunk, *normalize), message in [
            ((16, jnp.bfloat16, 2, 64), "backend='mosaic_gpu': head dims dk=16, dv=16 \\(the Hopper chunked kernels "
                                        "take 64\\)"),
            ((64, jnp.float32, 2, 64), "backend='mosaic_gpu': dtypes q=float32"),
            ((64, jnp.bfloat16, 1, 64, "softmax"), "backend='mosaic_gpu': normalize='softmax' at power 1 \\(the Hopper "
                                                   "chunked kernels take power 1 unnormalized\\)"),
            ((64, jnp.bfloat16, 2, 32), "backend='mosaic_gpu': chunk_size=32 \\(the Hopper chunked kernels take 64\\)"),
            ((64, jnp.bfloat16, 2, "grouped"), "backend='mosaic_gpu': 1 key heads for 2 query heads")]:
        q, k, v, a = random_qkv(rng, batch=1, length=9, heads=2, key_dim=dim, value_dim=dim, dtype=dtype)
        if chunk == "grouped":
            k, v, chunk = k[:, :, :1], v[:, :, :1], 64
        with pytest.raises(ValueError, match=message):
            chunked_attention_pallas(q, k, v, a, power=power, normalize=normalize[0] if normalize else None,
                                     scale=0.25, chunk_size=chunk, backend="mosaic_gpu")


def test_hopper_state_layout_maps_and_their_transposes(rng):
    """to_full / to_symmetric invert each other, and the hand-written transposes (gathers, no scatter) are their
    VJPs, on random states and cotangents (the maps compute in float32)."""
    as_f32 = lambda *shapes: tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes)
    symmetric = as_f32((3, 36, 5), (3, 36))  # d = 8
    full = hopper.to_full(*symmetric)
    assert tree_rel_error(hopper.to_symmetric(*full), symmetric) < 1e-6
    d_full = as_f32((3, 8, 8, 5), (3, 8, 8))
    _, full_vjp = jax.vjp(hopper.to_full, *symmetric)
    assert tree_rel_error(hopper.to_full_transpose(*d_full), full_vjp(d_full)) < 1e-6
    _, symmetric_vjp = jax.vjp(hopper.to_symmetric, *d_full)
    assert tree_rel_error(hopper.to_symmetric_transpose(*symmetric), symmetric_vjp(symmetric)) < 1e-6


def test_hopper_checkpoint_memory_is_bounded():
    """The backward's kept states fit in CHECKPOINT_BYTES by segments as short as that allows (powers of two times
    CHECKPOINT): 16 chunks at 1 x 131072 tokens and 16 heads (as measured), longer for more rows."""
    budget, per_head = hopper_backward.CHECKPOINT_BYTES, hopper_backward.CHECKPOINT_BYTES_PER_HEAD
    for batch_heads, num_chunks in [(1, 1), (16, 512), (16, 2048), (64, 2048), (128, 2048), (16, 65536)]:
        interval = hopper_backward.checkpoint_interval(batch_heads, num_chunks)
        kept = lambda interval: hopper_backward.checkpoints(num_chunks, interval) * batch_heads * per_head
        assert interval % hopper_backward.CHECKPOINT == 0 and math.log2(interval).is_integer()
        assert kept(interval) <= budget
        assert interval == hopper_backward.CHECKPOINT or kept(interval // 2) > budget
    assert hopper_backward.checkpoint_interval(16, 2048) == 16
    assert hopper_backward.checkpoint_interval(128, 2048) == 64


def test_hopper_walks_split_into_parts_only_where_heads_leave_programs_idle():
    assert [hopper.walk_parts(bh, chunks) for bh, chunks in [(16, 512), (64, 128), (128, 512), (16, 2048),
                                                              (2, 48), (2, 47), (16, 17), (33, 512), (16, 313)]] == \
        [8, 2, 1, 8, 3, 2, 1, 4, 8]
    # The chunks padded to a multiple of the parts: 20000 tokens, 313 chunks -> 320 (8 parts of 40).
    q = jax.ShapeDtypeStruct((1, 20000, 16, 64), jnp.bfloat16)
    ops = jax.eval_shape(lambda q: hopper.operands(q, q, q, jnp.zeros(q.shape[:3]), 0.125), q)
    assert ops.q.shape == (1, 320 * 64, 16, 64) and ops.chunk_decay.shape == (16, 320)


def test_hopper_forward_stops_at_document_starts(rng):
    """Rows holding documents that start at tokens 0, 70 and 100 (the kernels' -256 log-decay at each start, as
    decayed_attention passes it): output, normalizer and final states against the oracle given the segment ids."""
    q, k, v, a = random_qkv(rng, batch=1, length=130, heads=2, key_dim=64, value_dim=64, dtype=jnp.bfloat16,
                            decay=True)
    ids = jnp.asarray([[0] * 70 + [1] * 30 + [2] * 30], jnp.int32)
    upcast = lambda x: x.astype(jnp.float64)
    oracle = lambda values, **options: ops.decayed_attention(upcast(q), upcast(k), values, upcast(a), power=2,
                                                             segment_ids=ids, impl="reference", **options)
    y_ref, den_ref = oracle(upcast(v), normalize=None), oracle(jnp.ones_like(upcast(v)), normalize=None)
    _, state_ref = oracle(upcast(v), normalize="softmax", return_state=True)
    masked = with_document_starts(a.astype(jnp.float32), ids, at_start=KERNEL_DOCUMENT_START)
    zeros = hopper.to_full(jnp.zeros((2, 2080, 64)), jnp.zeros((2, 2080)))
    y, den, numerator, normalizer, _ = hopper.forward(q, k, v, masked, *zeros, scale=1 / 8, interpret=True)
    numerator, normalizer = hopper.to_symmetric(numerator, normalizer)
    assert rel_error(y, y_ref) < 1e-2
    assert rel_error(den.reshape(2, 130).T, den_ref[0, :, :, 0]) < 1e-2
    assert rel_error(numerator, state_ref.numerator.reshape(2, 2080, 64)) < 1e-2
    assert rel_error(normalizer, state_ref.normalizer.reshape(2, 2080)) < 1e-2


def test_hopper_kernels_lower_for_an_h200_on_cpu(monkeypatch):
    """Pallas -> Mosaic GPU lowering of the Hopper kernels, forward and backward, for an H200 without a GPU: Mosaic
    GPU's layout inference and its wgmma / TMA shape checks run here. The single-state walks in parts (4 of one
    chunk each), so that the parts' own walks lower too."""
    monkeypatch.setattr(hopper, "MIN_PART_CHUNKS", 1)
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    tokens = jax.ShapeDtypeStruct((1, 200, 2, 64), jnp.bfloat16)

    def loss(q, k, v, a, power, normalize):
        return jnp.sum(chunked_attention_pallas(q, k, v, a, power=power, normalize=normalize, scale=0.125,
                                                chunk_size=64, backend="mosaic_gpu").astype(jnp.float32))

    kernels = {(2, "softmax"): ("numerator", "normalizer", "dq", "dkv", "normalizer_dq", "normalizer_dk",
                                "part_walk"),
               (1, None): ("power1", "power1_dq", "power1_dkv", "part_walk")}
    for (power, normalize), names in kernels.items():
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
            lowered = jax.jit(jax.value_and_grad(functools.partial(loss, power=power, normalize=normalize),
                                                 argnums=(0, 1, 2, 3))).trace(
                tokens, tokens, tokens, jax.ShapeDtypeStruct((1, 200, 2), jnp.float32)).lower(
                    lowering_platforms=("cuda",))
        text = lowered.as_text()
        for kernel in names:
            assert f"twomamba_chunked_{kernel}_" in text, kernel
        assert "twomamba_chunk_states" not in text  # no Triton kernel


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("power,normalize,dim", [(2, "softmax", 64), (2, None, 128), (1, None, 64)])
def test_tpu_kernels_lower_to_mosaic_on_cpu(power, normalize, dim, dtype):
    """Pallas -> Mosaic lowering of the TPU kernels (forward and backward), without a TPU; d = 128 splits the
    features over programs. (libtpu's own layout passes run only on a TPU host.)"""
    tokens = jax.ShapeDtypeStruct((1, 200, 2, dim), dtype)
    decay = jax.ShapeDtypeStruct((1, 200, 2), jnp.float32)

    def loss(q, k, v, a):
        return jnp.sum(chunked_attention_pallas(q, k, v, a, power=power, normalize=normalize, scale=0.125,
                                                chunk_size=64, backend="tpu").astype(jnp.float32))

    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).trace(
        tokens, tokens, tokens, decay).lower(lowering_platforms=("tpu",))
    text = lowered.as_text()
    assert text.count("tpu_custom_call") == 5  # forward: states, outputs; backward: states again, reverse, grads
    for kernel in ("chunk_states", "chunk_outputs", "chunk_state_grads", "chunk_grads"):
        assert f"twomamba_{kernel}" in text, kernel


@pytest.mark.parametrize("platform,backend,interpret", [("gpu", "triton", False), ("tpu", "tpu", False),
                                                         ("cpu", "triton", True)])
def test_dispatch_picks_the_kernels_of_the_platform(rng, monkeypatch, platform, backend, interpret):
    from twomamba_jax.ops import api

    monkeypatch.setattr(api.jax, "default_backend", lambda: platform)
    monkeypatch.setattr(api, "_has_wgmma", lambda: False)  # a GPU without wgmma (Hopper: the next test)
    q, k, v, _ = random_qkv(rng, batch=1, length=9, heads=1, key_dim=16, value_dim=16, dtype=jnp.bfloat16)
    for family in ("chunked", "parallel"):
        kernel = api._kernel(family, q, k, v, power=2, requested="pallas",
                             **({"chunk_size": 64} if family == "chunked" else {}))
        assert kernel.keywords == {"backend": backend, "interpret": interpret}, family
    long, short = api.PARALLEL_MAX_LEN["gpu"][2] + 1, api.DENSE_MAX_LEN
    auto = {"gpu": ("pallas_chunked", "pallas_parallel", "pallas_parallel"),
            "tpu": ("pallas_chunked", "reference", "pallas_parallel"),
            "cpu": ("chunked", "reference", "reference")}[platform]
    assert (api._resolve_impl("auto", 2, 1, long), api._resolve_impl("auto", 2, 1, short),
            api._resolve_impl("auto", "exp", 1, long)) == auto
    assert api._resolve_impl("auto", 2, 1, short, stateful=True) == (
        "pallas_chunked" if platform == "gpu" else "reference")
    assert api._resolve_impl("pallas", 1, 1, short) == "pallas_chunked"  # power 1: chunked at every length


def test_hopper_gpus_take_the_mosaic_gpu_chunked_kernels_where_they_can(monkeypatch):
    """On a GPU with wgmma: the Mosaic GPU chunked kernels for power 2 and unnormalized power 1, d 64, bf16, chunk
    64, the Triton ones otherwise; and the Hopper entry of the tuning table (flash-style up to 16k tokens)."""
    from twomamba_jax.ops import api

    monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(api, "_has_wgmma", lambda: True)

    def backend(dim=64, dtype=jnp.bfloat16, power=2, chunk_size=64, normalize="softmax", heads=64, length=2048):
        q = jax.ShapeDtypeStruct((1, length, heads, dim), dtype)
        return api._kernel("chunked", q, q, q, power=power, requested="pallas", chunk_size=chunk_size,
                           normalize=normalize).keywords["backend"]

    assert backend() == backend(normalize=None) == backend(power=1, normalize=None) == "mosaic_gpu"
    assert [backend(dim=32), backend(dtype=jnp.float32), backend(power=1), backend(chunk_size=32)] == ["triton"] * 4
    # Power 1 on fewer rows x heads x tokens than HOPPER_POWER1_MIN_HEAD_TOKENS: Triton.
    assert api.HOPPER_POWER1_MIN_HEAD_TOKENS == 64 * 2048
    assert backend(power=1, normalize=None, heads=16, length=8192) == "mosaic_gpu"
    assert backend(power=1, normalize=None, heads=16, length=8191) == "triton"
    assert backend(heads=1, length=8) == "mosaic_gpu"
    hopper_max = api.PARALLEL_MAX_LEN["hopper"][2]
    assert (api._resolve_impl("pallas", 2, 1, hopper_max), api._resolve_impl("pallas", 2, 1, hopper_max + 1)) == (
        "pallas_parallel", "pallas_chunked")
    # Inputs the Mosaic GPU kernels do not take (d 32) run the Triton kernels, with the Triton entry.
    assert api._resolve_impl("pallas", 2, 1, hopper_max, mosaic_gpu=False) == "pallas_chunked"
    assert not api._mosaic_gpu_takes(jnp.zeros((1, 8, 2, 32), jnp.bfloat16), jnp.zeros((1, 8, 2, 32), jnp.bfloat16))
    monkeypatch.setattr(api, "_has_wgmma", lambda: False)  # e.g. an A100: no wgmma
    assert backend() == "triton"
    assert api._resolve_impl("pallas", 2, 1, api.PARALLEL_MAX_LEN["gpu"][2] + 1) == "pallas_chunked"
    assert api.PARALLEL_MAX_LEN["gpu"][2] < hopper_max


@pytest.mark.parametrize("backend", ["triton", "tpu"])
def test_selectors_are_built_on_chip_not_passed_as_constants(backend):
    """The forward kernels make the one-hot selectors (dk, F) from (1, F) int32 index rows, so the lowered forward
    holds no constant, and no array at all, of dk x F or more elements for them (the gradient kernel reads
    selectors made outside: see ``kernels/chunked/features.py``)."""
    import re

    from twomamba_jax.ops.features import feature_size

    dim = 64
    features = feature_size(dim, 2)  # 2080; padded to whole feature blocks in the kernels
    tokens = jax.ShapeDtypeStruct((1, 200, 2, dim), jnp.bfloat16)
    decay = jax.ShapeDtypeStruct((1, 200, 2), jnp.float32)

    def forward(q, k, v, a):
        return chunked_attention_pallas(q, k, v, a, power=2, normalize="softmax", scale=0.125, chunk_size=64,
                                        backend=backend)

    def lower(platform):
        traced = jax.jit(forward).trace(tokens, tokens, tokens, decay)
        return traced.lower(lowering_platforms=(platform,)).as_text()

    if backend == "tpu":
        text = lower("tpu")
    else:  # an abstract CUDA device, as in test_kernels_lower_for_the_gpu_on_cpu
        device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
            text = lower("cuda")

    def elements(tensor_type):  # "1x2176xi32" -> 2176, "f32" -> 1
        return math.prod(int(d) for d in tensor_type.split("x")[:-1])

    constants = [re.findall(r"tensor<([^>]*)>", line)[-1] for line in text.splitlines()
                 if "stablehlo.constant" in line]
    sizes = [elements(t) for t in constants]
    assert max(sizes) >= features  # the index rows and weights, (1, F_pad): the parse sees array constants
    assert max(sizes) < dim * features, [t for t in constants if elements(t) >= dim * features]
    # Nor a (dk, F_pad) array of any kind (a constant hoisted to an argument, say).
    assert not [f for f in re.findall(rf"tensor<{dim}x(\d+)x", text) if int(f) >= features]
