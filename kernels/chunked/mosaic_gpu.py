"""Chunked forward of power 2 for Hopper GPUs in Mosaic GPU (``plgpu.kernel``): the running state never leaves the
chip inside a sequence; every matmul is a 64 x 64 x 64 wgmma; no feature tile is built.

The state in the full outer-product layout. With phi(k)_ab = k_a k_b over all d^2 pairs, one head's numerator state
is d matrices ``S_a = sum_t e^(decay) k_ta k_t v_t^T`` (d x dv), one per row a of the outer product. Per chunk of
C = 64 tokens, with g the chunk-local cumulative log-decay and g_L its last value:

- readout (the state before the chunk): ``y += sum_a (q * r_a) S_a`` with ``r_a = scale^2 q_a e^g`` per token;
- update: ``S_a <- e^(g_L) S_a + k^T (v * u_a)`` with ``u_a = k_a e^(g_L - g)`` per token;

so each row a costs two matmuls whose operands are tiles already on chip, scaled per token (a broadcast product):
no gathers, no selector matmuls. The symmetric layout the API keeps (d(d+1)/2 features) would halve these FLOPs
but needs its features built; its states convert to and from this one outside (``to_full``, ``to_symmetric``).
Every per-token factor is <= 1 in the decay (chunk-local: nothing overflows); a document start (log-decay -256,
see ``ops.numerics``) makes ``e^(g_L - g)`` of the tokens before it and the carried state's ``e^(g_L)`` exact zeros.

Two kernels, three warpgroups each (two compute, one issuing the TMA copies of every chunk's tiles into a ring):

- ``_numerator_kernel``, grid (B H, d / 8): a program owns 8 rows a of one head's state, 4 per compute warpgroup,
  as float32 wgmma accumulators (4 x 64 x 64: 128 registers a thread) for its whole walk over the chunks. Per chunk
  it adds its rows' share of the inter-chunk output into y (float32) by a TMA reduction, then updates its rows.
  States are read once at the start and written once at the end.
- ``_normalizer_kernel``, grid (B H,): warpgroup 0 carries the normalizer ``Z = sum e^(decay) k k^T`` (d x d) the
  same way (readout ``den += rowsum((q * scale^2 e^g) Z * q)``); warpgroup 1 adds each chunk's intra-chunk part,
  the masked quadratic ``W = (scale q k^T)^2 e^(g_i - g_j)``, to y and its row sums to den.

y / den is taken outside. Head dims 64 (dk = dv = 64), bfloat16 operands, float32 states and accumulators.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from twomamba_jax.kernels.layout import heads_first
from twomamba_jax.kernels.parallel.mosaic_gpu import (LOG2E, causal_mask, diagonal_decay, head_indices, interpret_params,
                                                      matmul, matmul_add, matmul_into, ring_copies, smem_tile,
                                                      stream)
from twomamba_jax.kernels.parallel.mosaic_gpu_backward import add_to_global, to_global
from twomamba_jax.ops.features import _symmetric_pairs

CHUNK = 64  # tokens per chunk: the M of every wgmma
HEAD_DIM = 64  # dk = dv: a state row S_a is one 64 x 64 accumulator
ROWS_PER_WARPGROUP = 4  # state rows a per compute warpgroup (registers)
ROWS_PER_PROGRAM = 2 * ROWS_PER_WARPGROUP
_WGMMA = plgpu.Layout.WGMMA
_F32 = jnp.float32


def unsupported_reason(q, k, v, *, power) -> str | None:
    """Why these kernels do not take the inputs, or None."""
    if power != 2:
        return f"power={power!r} (the Hopper chunked kernels take power 2)"
    if (q.shape[-1], v.shape[-1]) != (HEAD_DIM, HEAD_DIM):
        return f"head dims dk={q.shape[-1]}, dv={v.shape[-1]} (the Hopper chunked kernels take {HEAD_DIM})"
    if q.dtype != jnp.bfloat16 or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype} (the Hopper chunked kernels take bfloat16)"
    return None


def to_full(numerator, normalizer):
    """Symmetric-feature states (..., d(d+1)/2, dv) and (..., d(d+1)/2) -> the full layout (..., d, d, dv) and
    (..., d, d), float32: S[a, b] = S[b, a] = S_sym[pair(a, b)] / w_ab (w = sqrt(2) off the diagonal)."""
    features = normalizer.shape[-1]
    dim = int(round((np.sqrt(8 * features + 1) - 1) / 2))
    rows, cols, weights = _symmetric_pairs(dim)
    index = np.zeros((dim, dim), np.int32)
    index[rows, cols] = index[cols, rows] = np.arange(features)
    inverse = (1.0 / weights)[index].astype(np.float32)
    return (jnp.take(numerator.astype(_F32), index, axis=-2) * inverse[..., None],
            jnp.take(normalizer.astype(_F32), index, axis=-1) * inverse)


def to_symmetric(numerator, normalizer):
    """The inverse of ``to_full``, the two halves averaged (rounding leaves S[a, b] and S[b, a] a little apart)."""
    rows, cols, weights = _symmetric_pairs(normalizer.shape[-1])
    weights = weights.astype(np.float32)
    numerator = (numerator[..., rows, cols, :] + numerator[..., cols, rows, :]) * (0.5 * weights[:, None])
    return numerator, (normalizer[..., rows, cols] + normalizer[..., cols, rows]) * (0.5 * weights)


def forward(q, k, v, log_decay, numerator0, normalizer0, *, scale, stages=2, interpret=False):
    """The chunked power-2 forward on Hopper, token-major operands (as the model holds them).

    q: (B, N, H, 64); k, v: (B, N, Hk, 64), Hk dividing H, bfloat16; log_decay: (B, N, H) float32 (<= 0);
    numerator0: (B H, 64, 64, 64), normalizer0: (B H, 64, 64) float32, the initial states in the full layout
    (``to_full``). ``interpret``: run in the Mosaic GPU interpreter. Returns the unnormalized output (B, N, H, 64)
    and the normalizer of every token (B H, N), float32, and the final states in the full layout.
    """
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    bh = batch * heads
    padded = -(-length // CHUNK) * CHUNK
    num_chunks = padded // CHUNK
    interpret = interpret_params(interpret)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
    q, k, v = pad(q), pad(k), pad(v)
    gamma = jnp.cumsum(heads_first(log_decay.astype(_F32), padded).reshape(bh, num_chunks, CHUNK), -1)
    last = gamma[..., -1:]
    row_decay = (scale * scale * jnp.exp(gamma)).reshape(bh, padded)  # the readout's factor per token
    key_decay = jnp.exp(last - gamma).reshape(bh, padded)  # the update's, e^(g_L - g)
    chunk_decay = jnp.exp(last[..., 0])  # (B H, chunks): the carried state's
    # Per-token factors of every state row a, rows first (B H, d, Np): a program copies its 8 rows a chunk.
    by_rows = lambda x, factor: jnp.swapaxes(heads_first(x.astype(_F32), padded) * factor[..., None], 1, 2)
    row_factors = by_rows(q, row_decay)
    key_factors = by_rows(jnp.repeat(k, group, axis=2), key_decay)
    y = jax.new_ref(jnp.zeros((2 if interpret else 1, batch, padded, heads, dim), _F32))
    common = dict(num_heads=heads, group=group, stages=stages, num_chunks=num_chunks, interpret=interpret)

    numerator = _launch(functools.partial(_numerator_kernel, **common), "twomamba_chunked_numerator",
                        jax.ShapeDtypeStruct((bh, dim, dim, dim), _F32), _numerator_scratch(stages, q.dtype, interpret),
                        (bh, dim // ROWS_PER_PROGRAM), ("heads", "rows"), interpret)(
        q, k, v, row_factors, key_factors, chunk_decay, numerator0, y)
    den, normalizer = _launch(
        functools.partial(_normalizer_kernel, scale=scale, **common), "twomamba_chunked_normalizer",
        (jax.ShapeDtypeStruct((2, bh, padded), _F32), jax.ShapeDtypeStruct((bh, dim, dim), _F32)),
        _normalizer_scratch(stages, q.dtype, interpret), (bh,), ("heads",), interpret)(
        q, k, v, row_decay, key_decay, *[gamma.reshape(bh, padded) * LOG2E] * 2, chunk_decay, normalizer0, y)
    y = y[...].sum(0) if interpret else y[...][0]
    return y[:, :length], den.sum(0)[:, :length], numerator, normalizer


def _launch(kernel, name, out_type, scratch, grid, grid_names, interpret):
    return plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=grid_names,
                        num_threads=3, thread_name="wg", kernel_name=name,
                        compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret)


def _ring_scratch(stages, dtype, vectors):
    """The ring of chunk tiles: q, k, v (C, d) and ``vectors`` (name -> per-slot shape, float32), with their
    barriers and the slots' ``consumed_bar`` (both compute warpgroups arrive)."""
    scratch = {"consumed_bar": plgpu.Barrier(num_arrivals=2, num_barriers=stages)}
    for name in ("q", "k", "v"):
        scratch[f"{name}_smem"] = smem_tile((stages, CHUNK, HEAD_DIM), dtype)
    for name, shape in vectors.items():
        scratch[f"{name}_smem"] = plgpu.SMEM((stages, *shape), _F32)
    for name in ("q", "k", "v", *vectors):
        scratch[f"{name}_bar"] = plgpu.Barrier(num_barriers=stages)
    return scratch


def _own_scratch(dtype, interpret):
    """Per compute warpgroup: a state as a wgmma operand (``state_smem``), the scaled values (``vals_smem``), a
    float32 tile for states in and out and y's additions, and in the interpreter the staging and summing tiles
    (``matmul_into``, ``add_to_global``)."""
    tile = (2, CHUNK, HEAD_DIM)
    scratch = {"state_smem": smem_tile(tile, dtype), "vals_smem": smem_tile(tile, dtype),
               "f32_smem": smem_tile(tile, _F32), "f32_bar": plgpu.Barrier(num_barriers=2)}
    if interpret:
        scratch.update(staging_smem=smem_tile(tile, dtype), sum_smem=smem_tile(tile, _F32),
                       sum_bar=plgpu.Barrier(num_barriers=2))
    return scratch


def _numerator_scratch(stages, dtype, interpret):
    rows = (ROWS_PER_PROGRAM, CHUNK)
    return {**_ring_scratch(stages, dtype, {"rq": rows, "rk": rows}), **_own_scratch(dtype, interpret),
            "f32_consumed_bar": plgpu.Barrier(num_barriers=2)}


def _normalizer_scratch(stages, dtype, interpret):
    vectors = {name: (CHUNK,) for name in ("er", "ek", "g_rows", "g_cols")}
    return {**_ring_scratch(stages, dtype, vectors),
            **_own_scratch(dtype, interpret), "den_smem": plgpu.SMEM((2, CHUNK), _F32)}


def _tile_ring(smem, refs, head, batch, query_head, key_head, vectors):
    """(issue, wait_tile) of the chunk ring: q of the query head, k and v of its key head, and ``vectors``
    (name -> function of the chunk's token slice giving the global source)."""
    q_ref, k_ref, v_ref = refs
    ring = [("q", lambda t: q_ref.at[batch, t, query_head]), ("k", lambda t: k_ref.at[batch, t, key_head]),
            ("v", lambda t: v_ref.at[batch, t, key_head]), *vectors.items()]
    return ring_copies(ring, smem, lambda step: step, size=CHUNK)


def _scaled_rows(tile, factor):
    """``tile * factor[:, None]`` in float32, ``tile`` a (C, d) shared-memory ref, ``factor`` (C,) in the wgmma
    row layout."""
    x = plgpu.load(tile, layout=_WGMMA).astype(_F32)
    return x * lax.broadcast_in_dim(factor, x.shape, [0])


def _store(tile, value):
    """``value`` into a shared-memory tile that a wgmma reads next."""
    tile[...] = value.astype(tile.dtype)
    plgpu.commit_smem()


def _own(smem, wg):
    """This warpgroup's tiles, and in the interpreter its staging tile and its (tile, barrier) for sums."""
    staging = smem["staging_smem"].at[wg] if "staging_smem" in smem else None
    total = (smem["sum_smem"].at[wg], smem["sum_bar"].at[wg]) if "sum_smem" in smem else None
    return smem["state_smem"].at[wg], smem["vals_smem"].at[wg], smem["f32_smem"].at[wg], staging, total


def _update(state, decay, k_tile, vals_tile, interpret):
    """``decay * state + k^T vals`` (the state's rows: k's columns)."""
    return matmul_add(state * decay, k_tile.transpose((1, 0)), vals_tile, interpret)


def _numerator_kernel(q_ref, k_ref, v_ref, rq_ref, rk_ref, cd_ref, s0_ref, y_ref, s_ref, *, num_heads, group,
                      stages, num_chunks, interpret, **smem):
    head, batch, query_head, key_head = head_indices(num_heads, group)
    first_row = lax.axis_index("rows") * ROWS_PER_PROGRAM
    wg = lax.axis_index("wg")
    rows_of = lambda ref: (lambda t: ref.at[head, pl.ds(first_row, ROWS_PER_PROGRAM), t])
    issue, wait_tile = _tile_ring(smem, (q_ref, k_ref, v_ref), head, batch, query_head, key_head,
                                  {"rq": rows_of(rq_ref), "rk": rows_of(rk_ref)})
    f32_bar, f32_consumed = smem["f32_bar"], smem["f32_consumed_bar"]

    def initial_states():  # each compute warpgroup's 4 rows, one at a time through its float32 tile
        for w in range(2):
            for i in range(ROWS_PER_WARPGROUP):
                if i:
                    plgpu.barrier_wait(f32_consumed.at[w])
                plgpu.copy_gmem_to_smem(s0_ref.at[head, first_row + w * ROWS_PER_WARPGROUP + i],
                                        smem["f32_smem"].at[w], f32_bar.at[w])
        for w in range(2):
            plgpu.barrier_wait(f32_consumed.at[w])

    pl.when(wg == 2)(lambda: stream(jnp.int32(num_chunks), stages, smem["consumed_bar"], issue, prologue=initial_states))

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        state_tile, vals_tile, f32_tile, staging, total = _own(smem, wg)
        own_rows = [wg * ROWS_PER_WARPGROUP + i for i in range(ROWS_PER_WARPGROUP)]  # of the program's 8
        states = []
        for _ in own_rows:
            plgpu.barrier_wait(f32_bar.at[wg])
            states.append(plgpu.load(f32_tile, layout=_WGMMA))
            plgpu.barrier_arrive(f32_consumed.at[wg])

        def chunk(c, states):
            slot = lax.rem(c, jnp.int32(stages))
            wait_tile(slot)
            q_tile, k_tile, v_tile = (smem[f"{name}_smem"].at[slot] for name in ("q", "k", "v"))
            row_factor = lambda name, row: plgpu.load(smem[f"{name}_smem"].at[slot, row], layout=_WGMMA.reduce(1))
            decay = cd_ref[head, c]
            y = plgpu.layout_cast(jnp.zeros((CHUNK, HEAD_DIM), _F32), _WGMMA)
            updated = []
            for row, state in zip(own_rows, states):
                _store(state_tile, state)  # the state before the chunk, as the readout's operand
                queries = _scaled_rows(q_tile, row_factor("rq", row)).astype(q_tile.dtype)
                y = matmul_into(y, queries, state_tile, staging)
                _store(vals_tile, _scaled_rows(v_tile, row_factor("rk", row)))
                updated.append(_update(state, decay, k_tile, vals_tile, interpret))
            plgpu.barrier_arrive(smem["consumed_bar"].at[slot])
            rows = pl.ds(c * CHUNK, CHUNK)
            add_to_global(y, f32_tile, y_ref.at[wg if interpret else 0, batch, rows, query_head], total)
            return tuple(updated)

        states = lax.fori_loop(jnp.int32(0), jnp.int32(num_chunks), chunk, tuple(states))
        to_global([(state, f32_tile, s_ref.at[head, first_row + row]) for row, state in zip(own_rows, states)])


def _normalizer_kernel(q_ref, k_ref, v_ref, er_ref, ek_ref, g_rows_ref, g_cols_ref, cd_ref, z0_ref, y_ref, den_ref,
                       z_ref, *,
                       scale, num_heads, group, stages, num_chunks, interpret, **smem):
    head, batch, query_head, key_head = head_indices(num_heads, group)
    wg = lax.axis_index("wg")
    vector = lambda ref: (lambda t: ref.at[head, t])
    issue, wait_tile = _tile_ring(smem, (q_ref, k_ref, v_ref), head, batch, query_head, key_head,
                                  {"er": vector(er_ref), "ek": vector(ek_ref), "g_rows": vector(g_rows_ref),
                                   "g_cols": vector(g_cols_ref)})
    pl.when(wg == 2)(lambda: stream(jnp.int32(num_chunks), stages, smem["consumed_bar"], issue))
    column = lambda name, slot, axis: plgpu.load(smem[f"{name}_smem"].at[slot], layout=_WGMMA.reduce(axis))

    def write_den(den, c):
        den_tile = smem["den_smem"].at[wg]
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        den_tile[...] = den
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(den_tile, den_ref.at[wg, head, pl.ds(c * CHUNK, CHUNK)])

    @pl.when(wg == 0)
    def _normalizer():
        plgpu.set_max_registers(232, action="increase")
        z_tile, vals_tile, f32_tile, staging, _ = _own(smem, wg)
        plgpu.copy_gmem_to_smem(z0_ref.at[head], f32_tile, smem["f32_bar"].at[wg])
        plgpu.barrier_wait(smem["f32_bar"].at[wg])
        z = plgpu.load(f32_tile, layout=_WGMMA)

        def chunk(c, z):
            slot = lax.rem(c, jnp.int32(stages))
            wait_tile(slot)
            q_tile, k_tile = smem["q_smem"].at[slot], smem["k_smem"].at[slot]
            _store(z_tile, z)
            queries = _scaled_rows(q_tile, column("er", slot, 1))
            zero = plgpu.layout_cast(jnp.zeros((CHUNK, HEAD_DIM), _F32), _WGMMA)
            through_z = matmul_into(zero, queries.astype(q_tile.dtype), z_tile, staging)  # (q e^g scale^2) Z
            den = jnp.sum(through_z * plgpu.load(q_tile, layout=_WGMMA).astype(_F32), axis=1)
            _store(vals_tile, _scaled_rows(k_tile, column("ek", slot, 1)))
            z = _update(z, cd_ref[head, c], k_tile, vals_tile, interpret)
            plgpu.barrier_arrive(smem["consumed_bar"].at[slot])
            write_den(den, c)
            return z

        z = lax.fori_loop(jnp.int32(0), jnp.int32(num_chunks), chunk, z)
        to_global([(z, f32_tile, z_ref.at[head])])

    @pl.when(wg == 1)
    def _intra():
        plgpu.set_max_registers(232, action="increase")
        _, _, f32_tile, staging, total = _own(smem, wg)
        shape = (CHUNK, CHUNK)

        @pl.loop(jnp.int32(0), jnp.int32(num_chunks))
        def _(c):
            slot = lax.rem(c, jnp.int32(stages))
            wait_tile(slot)
            scores = matmul(smem["q_smem"].at[slot], smem["k_smem"].at[slot].transpose((1, 0)), shape) * scale
            # g twice: layout inference gives one shared-memory vector one layout
            g_row, g_col = column("g_rows", slot, 1), column("g_cols", slot, 0)
            log_decay = lax.broadcast_in_dim(g_row, shape, [0]) - lax.broadcast_in_dim(g_col, shape, [1])
            weights = (scores * scores * diagonal_decay(log_decay, causal_mask(shape))).astype(q_ref.dtype)
            den = jnp.sum(weights.astype(_F32), axis=1)  # the weights as the matmul reads them
            zero = plgpu.layout_cast(jnp.zeros((CHUNK, HEAD_DIM), _F32), _WGMMA)
            y = matmul_into(zero, weights, smem["v_smem"].at[slot], staging)
            plgpu.barrier_arrive(smem["consumed_bar"].at[slot])
            add_to_global(y, f32_tile, y_ref.at[0, batch, pl.ds(c * CHUNK, CHUNK), query_head], total)
            write_den(den, c)

        plgpu.wait_smem_to_gmem(0)
