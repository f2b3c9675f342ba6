"""Backward of the chunked power-2 forward on Hopper (``mosaic_gpu.py``): the same layout (each program's 8 rows
of the full d x d state in wgmma accumulators for its whole walk), every matmul a 64 x 64 x 64 wgmma.

With y_t = c_t sum_ab q_ta q_tb S[a, b] (c_t = scale^2 e^(g_t), S the state before the chunk, symmetric in a, b)
and the cotangents dy (of the unnormalized output; for normalized 2Mamba dy / den) and dden (of the normalizer):

- ``_dq_kernel``, grid (B H, d / 8), chunks first to last, recomputing S as the forward does: column a of dq is
  ``dq_ta = 2 c_t sum_b q_tb (dy S_a^T)_tb``, so a program writes exactly its own 8 columns (rows of dq^T).
- ``_dkv_kernel``, grid (B H, d / 8), chunks last to first, carrying the state's cotangent dS (from the final
  state's): ``dv += (k * u_a) dS_a`` (added into float32 by TMA reductions), column a of dk is
  ``dk_ta = 2 e^(g_L - g_t) sum_b k_tb (v dS_a^T)_tb``, then ``dS_a <- e^(g_L) dS_a + q^T (dy * r_a)``; what is
  left is the initial state's cotangent.
- ``_normalizer_dq_kernel``, grid (B H P,) as the forward's normalizer kernel (each head's chunks in P parts):
  warpgroup 0 walks Z forward for ``dq += 2 dden c (Z q)``; warpgroup 1 takes each chunk's intra-chunk part as
  the flash-style backward does (dq, dk and, added, dv).
- ``_normalizer_dk_kernel``, grid (B H P,): one warpgroup walks dZ backward for ``dk += 2 e^(g_L - g) (dZ k)``
  and the initial normalizer's cotangent.

The log-decay needs no kernel of its own: every weight is homogeneous of degree 2 in its query and in its key,
so the row and column sums of dW * W are q.dq / 2 and k.dk / 2, and the cotangent of a_t is the sum over the
pairs (i, j) with j < t <= i of dW * W. Over a segment of chunks that is a reverse cumulative sum of their
difference from t to the segment's end, plus the pairs spanning that end: <S, dS> + <Z, dZ> of the states after
the segment's last chunk and their cotangents. The walks keep those states every ``checkpoint_interval(...)``
chunks (the dq and normalizer-dq kernels S and Z, the dkv and normalizer-dk kernels dS and dZ, float32; 16
chunks unless that takes more than ``CHECKPOINT_BYTES``) and the final states close the last segment.
(One reverse sum over the whole sequence is the same in exact arithmetic, but the two terms of a pair are
rounded in different walks and do not cancel: measured on the H200 its error grew with N, 2.4e-2 at 8k and
3.5e-2 at 32k tokens.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from twomamba_jax.kernels.chunked.mosaic_gpu import (CHUNK, F32, HEAD_DIM, ROWS_PER_PROGRAM, ROWS_PER_WARPGROUP,
                                                     Readout, head_grid, head_program, intra_gradients, launch,
                                                     loaders, operands, own_scratch, own_tiles, pad_tokens,
                                                     receive_rows, ring_scratch, row_blocks, row_blocks_of, row_grid,
                                                     row_program, row_sum_with, rows_to_global, scaled_rows,
                                                     state_walk, store, update, vectors, walk_starts,
                                                     zeros)
from twomamba_jax.kernels.parallel.mosaic_gpu import interpret_params, matmul, matmuls
from twomamba_jax.kernels.parallel.mosaic_gpu_backward import add_to_global, to_global

CHECKPOINT = 16  # chunks per segment of the log-decay's cotangent (states kept after every 16th chunk), at least
CHECKPOINT_BYTES = 8 * 2**30  # the most the kept states may take; beyond it the segments grow
CHECKPOINT_BYTES_PER_HEAD = 2 * (HEAD_DIM**3 + HEAD_DIM**2) * 4  # S and dS, Z and dZ, float32: 2 MiB


def checkpoint_interval(batch_heads, num_chunks, bytes_per_head=CHECKPOINT_BYTES_PER_HEAD):
    """Chunks per segment: ``CHECKPOINT``, doubled until the kept states (``bytes_per_head`` a head and
    checkpoint: power 2's 2 MiB by default) fit in ``CHECKPOINT_BYTES``. For power 2: 16 chunks (4 GiB at 1 x
    131072 tokens, 16 heads) up to about 4M tokens times heads, then 32, 64, ... (8 x 131072: 64). Longer
    segments sum more terms in one float32 reverse sum, a less accurate log-decay cotangent, but the memory stays
    bounded."""
    per_checkpoint = batch_heads * bytes_per_head
    interval = CHECKPOINT
    while checkpoints(num_chunks, interval) * per_checkpoint > CHECKPOINT_BYTES:
        interval *= 2
    return interval


def checkpoints(num_chunks, interval):
    """How many chunk boundaries keep their states: after chunks interval - 1, 2 interval - 1, ..., before the
    last chunk."""
    return (num_chunks - 1) // interval


def _at_checkpoint(c, num_chunks, interval, action):
    """``action(m)`` if the boundary after chunk ``c`` is the m-th checkpoint."""
    due = (lax.rem(c + 1, jnp.int32(interval)) == 0) & (c < num_chunks - 1)
    pl.when(due)(lambda: action(lax.div(c, jnp.int32(interval))))


def backward(q, k, v, log_decay, d_out, d_den, numerator0, z0, d_numerator, d_normalizer, carried, *, scale,
             stages=2, interpret=False):
    """Cotangents of ``mosaic_gpu.forward``'s inputs.

    q, k, v, log_decay, numerator0 as the forward took them; z0: the normalizer walk's part starts it returned
    (its parts, too); d_out: (B, N, H, dv) the cotangent of the unnormalized output; d_den: (B H, N) of the
    normalizer; d_numerator (B H, d, d, dv), d_normalizer (B H, d, d): of the final states (full layout,
    symmetric); carried: (B H,) the final states' <S, dS> (both states). Returns dq, dk, dv and d_log_decay
    (B, N, H) in float32, and the initial states' cotangents (full layout).
    """
    batch, length, heads, dim = q.shape
    interpret = interpret_params(interpret)
    ops = operands(q, k, v, log_decay, scale, parts=z0.shape[0] // (batch * heads))  # the forward's parts
    bh, padded = ops.row_decay.shape
    dy = pad_tokens(d_out.astype(q.dtype), padded)
    d_den = jnp.pad(d_den.astype(F32), [(0, 0), (0, padded - length)])
    common = dict(num_heads=heads, stages=stages, num_chunks=padded // CHUNK, interpret=interpret)
    tokens = lambda: jax.ShapeDtypeStruct((batch, padded, heads, dim), F32)
    rows_first = jax.ShapeDtypeStruct((bh, dim, padded), F32)
    dtype = q.dtype
    dv = jax.new_ref(jnp.zeros((2 if interpret else 1, batch, padded, heads, dim), F32))
    qkv_dy = (ops.q, ops.k, ops.v, dy)
    interval = checkpoint_interval(bh, padded // CHUNK)
    common["interval"] = interval
    kept = checkpoints(padded // CHUNK, interval)
    kept_states = jax.ShapeDtypeStruct((bh, max(kept, 1), dim, dim, dim), F32)  # never written if kept = 0
    kept_normalizers = jax.ShapeDtypeStruct((bh, max(kept, 1), dim, dim), F32)

    dq_rows, kept_s = launch(
        functools.partial(_dq_kernel, **common), "twomamba_chunked_dq", (rows_first, kept_states),
        {**ring_scratch(stages, dtype, ("q", "k", "v", "dy"), {"rk": (ROWS_PER_PROGRAM + 1, CHUNK)}),
         **own_scratch(dtype, interpret), **_column_scratch()}, row_grid(bh), interpret)(
        *qkv_dy, with_row(ops.key_factors, ops.row_decay), ops.chunk_decay, numerator0)
    dk_rows, d_numerator0, kept_ds = launch(
        functools.partial(_dkv_kernel, **common), "twomamba_chunked_dkv",
        (rows_first, jax.ShapeDtypeStruct((bh, dim, dim, dim), F32), kept_states),
        {**ring_scratch(stages, dtype, ("q", "k", "v", "dy"),
                           {**row_blocks("rq"), "rk": (ROWS_PER_PROGRAM + 1, CHUNK)}),
         **own_scratch(dtype, interpret), **_column_scratch()}, row_grid(bh), interpret)(
        *qkv_dy, ops.row_factors, with_row(ops.key_factors, ops.key_decay), ops.chunk_decay, d_numerator, dv)
    parts = ops.parts
    walk = dict(num_heads=heads, parts=parts, stages=stages, interpret=interpret)
    dq_norm, dq_intra, dk_intra, kept_z = launch(
        functools.partial(_normalizer_dq_kernel, scale=scale, parts=parts, **common),
        "twomamba_chunked_normalizer_dq", (tokens(), tokens(), tokens(), kept_normalizers),
        {**ring_scratch(stages, dtype, ("q", "k", "v", "dy"), vectors("c", "ek", "g_rows", "g_cols", "dden")),
         **own_scratch(dtype, interpret)}, head_grid(bh, parts), interpret)(
        *qkv_dy, ops.row_decay, ops.key_decay, ops.log2_decay, ops.log2_decay, d_den, ops.chunk_decay, z0, dv)
    dz_factor = ops.row_decay * d_den
    dz0 = walk_starts(ops.q, ops.q, dz_factor, ops.chunk_decay, d_normalizer, reverse=True, **walk)
    dk_norm, d_normalizer0, kept_dz = launch(
        functools.partial(_normalizer_dk_kernel, parts=parts, **common), "twomamba_chunked_normalizer_dk",
        (tokens(), jax.ShapeDtypeStruct((bh * parts, dim, dim), F32), kept_normalizers),
        {**ring_scratch(stages, dtype, ("q", "k"), vectors("ek", "cdd"), consumers=1),
         **own_scratch(dtype, interpret)}, head_grid(bh, parts), interpret)(
        ops.q, ops.k, ops.key_decay, dz_factor, ops.chunk_decay, dz0)
    d_normalizer0 = d_normalizer0.reshape(bh, parts, dim, dim)[:, 0]

    token_major = lambda rows: jnp.moveaxis(rows.reshape(batch, heads, dim, padded), (1, 2), (2, 3))
    dq = token_major(dq_rows) + dq_norm + dq_intra
    dk = token_major(dk_rows) + dk_norm + dk_intra
    dv = dv[...].sum(0) if interpret else dv[...][0]
    # Row sums minus column sums of dW * W per token, summed to the segment's end, plus the pairs spanning it.
    spans = (jnp.sum(ops.q.astype(F32) * dq, -1) - jnp.sum(ops.k.astype(F32) * dk, -1)) / 2
    ends = jnp.concatenate([jnp.sum(kept_s[:, :kept] * kept_ds[:, :kept], axis=(2, 3, 4))
                            + jnp.sum(kept_z[:, :kept] * kept_dz[:, :kept], axis=(2, 3)), carried[:, None]], 1)
    d_log_decay = _segment_sums(spans, ends.reshape(batch, heads, kept + 1), interval)
    cut = lambda x: x[:, :length]
    return cut(dq), cut(dk), cut(dv), cut(d_log_decay), d_numerator0, d_normalizer0


def _segment_sums(spans, ends, interval):
    """spans (B, Np, H), ends (B, H, segments) -> (B, Np, H): the reverse cumulative sum of ``spans`` within each
    segment of ``interval`` chunks, plus its segment's end."""
    batch, padded, heads = spans.shape
    segments, length = ends.shape[-1], interval * CHUNK
    spans = jnp.pad(spans, [(0, 0), (0, segments * length - padded), (0, 0)]).reshape(batch, segments, length, heads)
    sums = jnp.flip(jnp.cumsum(jnp.flip(spans, 2), 2), 2) + jnp.moveaxis(ends, 1, 2)[:, :, None]
    return sums.reshape(batch, segments * length, heads)[:, :padded]


def with_row(factors, per_token):
    """Per program, its 8 rows of ``factors`` (B H, d, Np) and one more, ``per_token`` (B H, Np): (B H, d / 8, 9,
    Np): one TMA copy a chunk brings both."""
    bh, dim, padded = factors.shape
    blocks = factors.reshape(bh, dim // ROWS_PER_PROGRAM, ROWS_PER_PROGRAM, padded)
    extra = jnp.broadcast_to(per_token[:, None, None], (bh, dim // ROWS_PER_PROGRAM, 1, padded))
    return jnp.concatenate([blocks, extra], axis=2)


def _column_scratch():
    """Per compute warpgroup: its 4 columns of dq or dk for one chunk, (4, C) float32, written as rows of the
    transposed (B H, d, Np) output."""
    return {"cols_smem": plgpu.SMEM((2, ROWS_PER_WARPGROUP, CHUNK), F32)}


def _extended_rows(ref, head):
    """``per_token`` source of the program's block of a ``with_row`` array (B H, d / 8, 9, Np)."""
    return lambda t: ref.at[head, lax.axis_index("rows"), :, t]


def _own_columns(ref, p, c):
    """This compute warpgroup's 4 rows of a (B H, d, Np) transposed gradient, chunk ``c``."""
    return ref.at[p.head, pl.ds(p.first_row + p.wg * ROWS_PER_WARPGROUP, ROWS_PER_WARPGROUP), pl.ds(c * CHUNK, CHUNK)]


def _write_columns(smem, wg, columns, dst):
    """This warpgroup's columns (a list of (C,) vectors) -> ``dst`` (4, C) in global memory."""
    cols_tile = smem["cols_smem"].at[wg]
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for i, column in enumerate(columns):
        cols_tile.at[i][...] = column
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(cols_tile, dst)


def _dq_kernel(q_ref, k_ref, v_ref, dy_ref, rk_ref, cd_ref, s0_ref, dq_ref, kept_ref, *, num_heads, stages,
               num_chunks, interval, interpret, **smem):
    p = row_program(smem, num_heads, {"q": q_ref, "k": k_ref, "v": v_ref, "dy": dy_ref},
                    lambda head, _: {"rk": _extended_rows(rk_ref, head)}, s0_ref, num_chunks, stages)
    head, wg = p.head, p.wg
    tile, factor, _ = loaders(smem)

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        state_tile, vals_tile, f32_tile, staging, _ = own_tiles(smem, wg)

        def chunk(c, states):
            slot = lax.rem(c, jnp.int32(stages))
            p.wait_tile(slot)
            decay, twice_c = cd_ref[head, c], 2.0 * factor("rk", slot, ROWS_PER_PROGRAM)
            columns, updated = [], []
            for row, state in zip(p.own_rows, states):
                store(state_tile, state)
                through = matmul(tile("dy", slot), state_tile.transpose((1, 0)), (CHUNK, HEAD_DIM))  # dy S_a^T
                columns.append(twice_c * row_sum_with(tile("q", slot), through))
                store(vals_tile, scaled_rows(tile("v", slot), factor("rk", slot, row)))
                updated.append(update(state, decay, tile("k", slot), vals_tile, interpret))
            plgpu.barrier_arrive(smem["consumed_bar"].at[slot])
            _write_columns(smem, wg, columns, _own_columns(dq_ref, p, c))
            # The states after chunk c.
            _at_checkpoint(c, num_chunks, interval,
                           lambda m: rows_to_global(p, updated, f32_tile, kept_ref.at[head, m]))
            return tuple(updated)

        lax.fori_loop(jnp.int32(0), jnp.int32(num_chunks), chunk, tuple(receive_rows(smem, wg)))
        plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(q_ref, k_ref, v_ref, dy_ref, rq_ref, rk_ref, cd_ref, ds_ref, dv_ref, dk_ref, ds0_ref, kept_ref, *,
                num_heads, stages, num_chunks, interval, interpret, **smem):
    p = row_program(smem, num_heads, {"q": q_ref, "k": k_ref, "v": v_ref, "dy": dy_ref},
                    lambda head, first_row: {**row_blocks_of({"rq": rq_ref}, head, first_row),
                                             "rk": _extended_rows(rk_ref, head)},
                    ds_ref, num_chunks, stages, reverse=True)
    head, wg = p.head, p.wg
    tile, factor, _ = loaders(smem)

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        state_tile, vals_tile, f32_tile, staging, total = own_tiles(smem, wg)

        def step(s, grads):  # grads: the cotangents of the states after chunk c
            c = p.chunk_of_step(s)
            # The cotangents of the states after chunk c.
            _at_checkpoint(c, num_chunks, interval, lambda m: rows_to_global(p, grads, f32_tile, kept_ref.at[head, m]))
            slot = lax.rem(s, jnp.int32(stages))
            p.wait_tile(slot)
            decay, twice_ek = cd_ref[head, c], 2.0 * factor("rk", slot, ROWS_PER_PROGRAM)
            d_values, columns, carried = zeros(), [], []
            for row, grad in zip(p.own_rows, grads):
                # The three products are independent: operands staged, issued together, one wait.
                state_tile[...] = grad.astype(state_tile.dtype)
                vals_tile[...] = scaled_rows(tile("dy", slot), factor("rq", slot, row)).astype(vals_tile.dtype)
                plgpu.commit_smem()
                keys = scaled_rows(tile("k", slot), factor("rk", slot, row)).astype(state_tile.dtype)
                d_values, through, updated = matmuls(  # (k u_a) dS_a, v dS_a^T, the carried dS_a
                    [d_values, zeros(), grad * decay],
                    [(0, keys, state_tile), (1, tile("v", slot), state_tile.transpose((1, 0))),
                     (2, tile("q", slot).transpose((1, 0)), vals_tile)], interpret, staging)
                columns.append(twice_ek * row_sum_with(tile("k", slot), through))
                carried.append(updated)
            plgpu.barrier_arrive(smem["consumed_bar"].at[slot])
            _write_columns(smem, wg, columns, _own_columns(dk_ref, p, c))
            add_to_global(d_values, f32_tile,
                          dv_ref.at[wg if interpret else 0, p.batch, pl.ds(c * CHUNK, CHUNK), p.query_head], total)
            return tuple(carried)

        grads = lax.fori_loop(jnp.int32(0), jnp.int32(num_chunks), step, tuple(receive_rows(smem, wg)))
        rows_to_global(p, grads, f32_tile, ds0_ref.at[head])


def _normalizer_dq_kernel(q_ref, k_ref, v_ref, dy_ref, c_ref, ek_ref, g_rows_ref, g_cols_ref, dden_ref, cd_ref,
                          z0_ref, dv_ref, dq_norm_ref, dq_intra_ref, dk_intra_ref, kept_ref, *, scale, num_heads,
                          parts, stages, num_chunks, interval, interpret, **smem):
    p = head_program(smem, (q_ref, k_ref, v_ref, dy_ref), ("q", "k", "v", "dy"),
                     {"c": c_ref, "ek": ek_ref, "g_rows": g_rows_ref, "g_cols": g_cols_ref, "dden": dden_ref},
                     num_heads, num_chunks, stages, parts=parts)
    wg = lax.axis_index("wg")
    tile, _, column = loaders(smem)

    @pl.when(wg == 0)
    def _normalizer():  # dq += 2 dden c (Z q), from the (q c) Z the walk reads out
        plgpu.set_max_registers(232, action="increase")
        f32_tile = smem["f32_smem"].at[wg]
        twice_dden = lambda slot, through: lax.broadcast_in_dim(2.0 * column("dden", slot, 1), through.shape, [0])
        state_walk(smem, wg, p, z0_ref.at[p.program], cd_ref, [Readout("q", "c")], ("k", "k", "ek"),
                   lambda slot, results: results[0] * twice_dden(slot, results[0]),
                   lambda c, d_queries: to_global([(d_queries, f32_tile, p.rows_of(dq_norm_ref, c))], wait=False),
                   stages=stages, interpret=interpret,
                   keep=lambda c, z: _at_checkpoint(c, num_chunks, interval,
                                                    lambda m: to_global([(z, f32_tile, kept_ref.at[p.head, m])])))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _intra():
        plgpu.set_max_registers(232, action="increase")
        ds_tile, w_tile, f32_tile, staging, total = own_tiles(smem, wg)

        @pl.loop(jnp.int32(0), jnp.int32(p.steps))
        def _(s):
            c, slot = p.chunk_of_step(s), lax.rem(s, jnp.int32(stages))
            p.wait_tile(slot)
            dq, dk, d_values = intra_gradients(tile, column, slot, power=2, scale=scale, ds_tile=ds_tile,
                                               w_tile=w_tile, staging=staging, interpret=interpret,
                                               dden=column("dden", slot, 1))
            plgpu.barrier_arrive(smem["consumed_bar"].at[slot])
            to_global([(dq, f32_tile, p.rows_of(dq_intra_ref, c)), (dk, f32_tile, p.rows_of(dk_intra_ref, c))],
                      wait=False)
            add_to_global(d_values, f32_tile, p.rows_of(dv_ref.at[0], c), total)

        plgpu.wait_smem_to_gmem(0)


def _normalizer_dk_kernel(q_ref, k_ref, ek_ref, cdd_ref, cd_ref, dz_ref, dk_norm_ref, dz0_ref, kept_ref, *,
                          num_heads, parts, stages, num_chunks, interval, interpret, **smem):
    p = head_program(smem, (q_ref, k_ref), "qk", {"ek": ek_ref, "cdd": cdd_ref}, num_heads, num_chunks, stages,
                     reverse=True, parts=parts)
    wg = lax.axis_index("wg")

    @pl.when(wg == 0)
    def _normalizer():  # dk += 2 e^(g_L - g) (dZ k), dZ <- e^(g_L) dZ + q^T (q c dden)
        plgpu.set_max_registers(232, action="increase")
        f32_tile = smem["f32_smem"].at[wg]
        grad = state_walk(
            smem, wg, p, dz_ref.at[p.program], cd_ref, [Readout("k", "ek")], ("q", "q", "cdd"),
            lambda slot, results: 2.0 * results[0],
            lambda c, d_keys: to_global([(d_keys, f32_tile, p.rows_of(dk_norm_ref, c))], wait=False),
            stages=stages, interpret=interpret,
            keep=lambda c, dz: _at_checkpoint(c, num_chunks, interval,
                                              lambda m: to_global([(dz, f32_tile, kept_ref.at[p.head, m])])))
        to_global([(grad, f32_tile, dz0_ref.at[p.program])])
