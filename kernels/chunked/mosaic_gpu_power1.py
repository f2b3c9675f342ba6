"""Chunked power 1 (unnormalized) for Hopper GPUs in Mosaic GPU, forward and backward: each head's (d, dv) state
is one 64 x 64 wgmma accumulator that one warpgroup carries through the chunks (``state_walk``) and never writes to
memory but at the ends (and, in the backward, at the log-decay's checkpoints).

With g the chunk-local cumulative log-decay, g_L its last value, c_t = scale e^(g_t), u_t = e^(g_L - g_t) and S
the state before the chunk (all factors <= scale: nothing overflows; a document start's log-decay of -256 makes
them exact zeros, see ``ops.numerics``):

    y = c (q S) + W v,  W = (scale q k^T) * e^(g_i - g_j) masked to j <= i;  S <- e^(g_L) S + k^T (v u).

Three kernels, grid (B H P,), three warpgroups (two compute, one streaming the chunks' tiles by TMA). Where B H
alone leaves SMs idle, each head's chunks split into P parts (``walk_parts``), each walked by its own program from
the state ``walk_starts`` gives it (a two-level scan: the parts' own walks from zero, then combined across parts):

- ``_forward_kernel``: warpgroup 0 walks S and adds (q c) S to y, warpgroup 1 adds each chunk's W v.
- ``_dq_kernel``, first chunk to last: warpgroup 0 walks S again for ``dq += (dy c) S^T`` and keeps S at the
  checkpoints; warpgroup 1 takes each chunk's intra-chunk dq, dk, dv (``intra_gradients``).
- ``_dkv_kernel``, last chunk to first: warpgroup 0 walks the state's cotangent dS from the final state's:
  ``dv += (k u) dS``, ``dk += (v u) dS^T``, ``dS <- e^(g_L) dS + q^T (dy c)``; what is left is the initial
  state's cotangent. dS is kept at the checkpoints.

The log-decay's cotangent is that of ``mosaic_gpu_backward``, for weights of degree 1 in their query and key: the
row and column sums of dW * W are q.dq and k.dk; their difference summed in reverse within each segment of
``checkpoint_interval`` chunks, plus <S, dS> at the segment's end. Head dims 64, bfloat16 operands, float32
states; the normalized power 1 keeps the Triton kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from twomamba_jax.kernels.chunked.mosaic_gpu import (CHUNK, F32, Readout, head_grid, head_program, intra_gradients,
                                                     intra_weights, launch, loaders, operands, own_scratch, own_tiles,
                                                     pad_tokens, ring_scratch, state_walk, vectors, walk_starts,
                                                     zeros)
from twomamba_jax.kernels.chunked.mosaic_gpu_backward import (_at_checkpoint, _segment_sums, checkpoint_interval,
                                                              checkpoints)
from twomamba_jax.kernels.parallel.mosaic_gpu import interpret_params, matmul_into
from twomamba_jax.kernels.parallel.mosaic_gpu_backward import add_to_global, to_global

STATE_BYTES_PER_HEAD = 2 * 64 * 64 * 4  # a checkpoint of S and of dS, float32


def forward(q, k, v, log_decay, state0, *, scale, parts=None, stages=2, interpret=False):
    """q, k, v: (B, N, H, 64) bfloat16; log_decay: (B, N, H) float32 (<= 0); state0: (B H, 64, 64) float32.
    Returns y (B, N, H, 64) float32, the final state (B H, 64, 64) float32 and the state each part of the walk
    starts from (B H P, 64, 64) (``walk_starts``; the backward's walk reads it again). ``parts``: P (default
    ``walk_parts``)."""
    batch, length, heads, dim = q.shape
    interpret = interpret_params(interpret)
    ops = operands(q, k, v, log_decay, scale, power=1, parts=parts)
    (q, k, v), c, u, chunk_decay, log2_decay = ops[:3], ops.row_decay, ops.key_decay, ops.chunk_decay, ops.log2_decay
    bh, padded = c.shape
    parts = ops.parts
    starts = walk_starts(k, v, u, chunk_decay, state0, num_heads=heads, parts=parts, stages=stages,
                         interpret=interpret)
    y = jax.new_ref(jnp.zeros((2 if interpret else 1, batch, padded, heads, dim), F32))
    state = launch(
        functools.partial(_forward_kernel, scale=scale, num_heads=heads, parts=parts, stages=stages,
                          num_chunks=padded // CHUNK, interpret=interpret), "twomamba_chunked_power1",
        jax.ShapeDtypeStruct((bh * parts, dim, dim), F32),
        {**ring_scratch(stages, q.dtype, "qkv", vectors("c", "ek", "g_rows", "g_cols")),
         **own_scratch(q.dtype, interpret)}, head_grid(bh, parts), interpret)(
        q, k, v, c, u, log2_decay, log2_decay, chunk_decay, starts, y)
    y = y[...].sum(0) if interpret else y[...][0]
    return y[:, :length], state.reshape(bh, parts, dim, dim)[:, -1], starts


def backward(q, k, v, log_decay, d_out, starts, d_state, carried, *, scale, stages=2, interpret=False):
    """Cotangents of ``forward``'s inputs: starts, the part starts ``forward`` returned (its parts, too);
    d_out (B, N, H, 64) of y, d_state (B H, 64, 64) of the final state, carried (B H,) the final state's <S, dS>.
    Returns dq, dk, dv, d_log_decay (B, N, H) and the initial state's cotangent, float32."""
    batch, length, heads, dim = q.shape
    interpret = interpret_params(interpret)
    ops = operands(q, k, v, log_decay, scale, power=1, parts=starts.shape[0] // (batch * heads))
    (q, k, v), c, u, chunk_decay, log2_decay = ops[:3], ops.row_decay, ops.key_decay, ops.chunk_decay, ops.log2_decay
    bh, padded = c.shape
    num_chunks = padded // CHUNK
    interval = checkpoint_interval(bh, num_chunks, STATE_BYTES_PER_HEAD)
    kept = checkpoints(num_chunks, interval)
    tokens = jax.ShapeDtypeStruct((batch, padded, heads, dim), F32)
    kept_states = jax.ShapeDtypeStruct((bh, max(kept, 1), dim, dim), F32)  # never written if kept = 0
    parts = ops.parts
    common = dict(num_heads=heads, parts=parts, stages=stages, num_chunks=num_chunks, interval=interval,
                  interpret=interpret)
    dy = pad_tokens(d_out.astype(q.dtype), padded)
    walk = dict(num_heads=heads, parts=parts, stages=stages, interpret=interpret)
    grad_starts = walk_starts(q, dy, c, chunk_decay, d_state, reverse=True, **walk)

    dq_inter, dq_intra, dk_intra, dv_intra, kept_s = launch(
        functools.partial(_dq_kernel, scale=scale, **common), "twomamba_chunked_power1_dq",
        (tokens, tokens, tokens, tokens, kept_states),
        {**ring_scratch(stages, q.dtype, ("q", "k", "v", "dy"), vectors("c", "ek", "g_rows", "g_cols")),
         **own_scratch(q.dtype, interpret)}, head_grid(bh, parts), interpret)(
        q, k, v, dy, c, u, log2_decay, log2_decay, chunk_decay, starts)
    dk_inter, dv_inter, d_state0, kept_ds = launch(
        functools.partial(_dkv_kernel, **common), "twomamba_chunked_power1_dkv",
        (tokens, tokens, jax.ShapeDtypeStruct((bh * parts, dim, dim), F32), kept_states),
        {**ring_scratch(stages, q.dtype, ("q", "k", "v", "dy"), vectors("c", "ek"), consumers=1),
         **own_scratch(q.dtype, interpret)}, head_grid(bh, parts), interpret)(
        q, k, v, dy, c, u, chunk_decay, grad_starts)
    d_state0 = d_state0.reshape(bh, parts, dim, dim)[:, 0]

    dq, dk, dv = dq_inter + dq_intra, dk_inter + dk_intra, dv_inter + dv_intra
    spans = jnp.sum(q.astype(F32) * dq, -1) - jnp.sum(k.astype(F32) * dk, -1)  # row minus column sums of dW W
    ends = jnp.concatenate([jnp.sum(kept_s[:, :kept] * kept_ds[:, :kept], axis=(2, 3)), carried[:, None]], 1)
    d_log_decay = _segment_sums(spans, ends.reshape(batch, heads, kept + 1), interval)
    cut = lambda x: x[:, :length]
    return cut(dq), cut(dk), cut(dv), cut(d_log_decay), d_state0


def _forward_kernel(q_ref, k_ref, v_ref, c_ref, ek_ref, g_rows_ref, g_cols_ref, cd_ref, s0_ref, y_ref, s_ref, *,
                    scale, num_heads, parts, stages, num_chunks, interpret, **smem):
    p = head_program(smem, (q_ref, k_ref, v_ref), "qkv",
                     {"c": c_ref, "ek": ek_ref, "g_rows": g_rows_ref, "g_cols": g_cols_ref}, num_heads, num_chunks,
                     stages, parts=parts)
    wg = lax.axis_index("wg")
    tile, _, column = loaders(smem)
    _, _, f32_tile, staging, total = own_tiles(smem, wg)
    add_y = lambda c, y: add_to_global(y, f32_tile, p.rows_of(y_ref.at[wg if interpret else 0], c), total)

    @pl.when(wg == 0)
    def _walk():  # y += (q c) S
        plgpu.set_max_registers(232, action="increase")
        state = state_walk(smem, wg, p, s0_ref.at[p.program], cd_ref, [Readout("q", "c")], ("k", "v", "ek"),
                           lambda slot, results: results[0], add_y, stages=stages, interpret=interpret)
        to_global([(state, f32_tile, s_ref.at[p.program])])

    @pl.when(wg == 1)
    def _intra():  # y += W v
        plgpu.set_max_registers(232, action="increase")

        @pl.loop(jnp.int32(0), jnp.int32(p.steps))
        def _(s):
            c, slot = p.chunk_of_step(s), lax.rem(s, jnp.int32(stages))
            p.wait_tile(slot)
            weights = intra_weights(tile, column, slot, scale, power=1).astype(q_ref.dtype)
            y = matmul_into(zeros(), weights, tile("v", slot), staging)
            plgpu.barrier_arrive(smem["consumed_bar"].at[slot])
            add_y(c, y)

        plgpu.wait_smem_to_gmem(0)


def _dq_kernel(q_ref, k_ref, v_ref, dy_ref, c_ref, ek_ref, g_rows_ref, g_cols_ref, cd_ref, s0_ref, dq_inter_ref,
               dq_intra_ref, dk_intra_ref, dv_intra_ref, kept_ref, *, scale, num_heads, parts, stages, num_chunks,
               interval, interpret, **smem):
    p = head_program(smem, (q_ref, k_ref, v_ref, dy_ref), ("q", "k", "v", "dy"),
                     {"c": c_ref, "ek": ek_ref, "g_rows": g_rows_ref, "g_cols": g_cols_ref}, num_heads, num_chunks,
                     stages, parts=parts)
    wg = lax.axis_index("wg")
    tile, _, column = loaders(smem)
    ds_tile, w_tile, f32_tile, staging, _ = own_tiles(smem, wg)

    @pl.when(wg == 0)
    def _walk():  # dq += (dy c) S^T
        plgpu.set_max_registers(232, action="increase")
        state_walk(smem, wg, p, s0_ref.at[p.program], cd_ref, [Readout("dy", "c", True)], ("k", "v", "ek"),
                   lambda slot, results: results[0],
                   lambda c, dq: to_global([(dq, f32_tile, p.rows_of(dq_inter_ref, c))], wait=False),
                   stages=stages, interpret=interpret,
                   keep=lambda c, s: _at_checkpoint(c, num_chunks, interval,
                                                    lambda m: to_global([(s, f32_tile, kept_ref.at[p.head, m])])))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _intra():
        plgpu.set_max_registers(232, action="increase")

        @pl.loop(jnp.int32(0), jnp.int32(p.steps))
        def _(s):
            c, slot = p.chunk_of_step(s), lax.rem(s, jnp.int32(stages))
            p.wait_tile(slot)
            dq, dk, dv = intra_gradients(tile, column, slot, power=1, scale=scale, ds_tile=ds_tile, w_tile=w_tile,
                                         staging=staging, interpret=interpret)
            plgpu.barrier_arrive(smem["consumed_bar"].at[slot])
            to_global([(dq, f32_tile, p.rows_of(dq_intra_ref, c)), (dk, f32_tile, p.rows_of(dk_intra_ref, c)),
                       (dv, f32_tile, p.rows_of(dv_intra_ref, c))], wait=False)

        plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(q_ref, k_ref, v_ref, dy_ref, c_ref, ek_ref, cd_ref, ds_ref, dk_ref, dv_ref, ds0_ref, kept_ref, *,
                num_heads, parts, stages, num_chunks, interval, interpret, **smem):
    p = head_program(smem, (q_ref, k_ref, v_ref, dy_ref), ("q", "k", "v", "dy"), {"c": c_ref, "ek": ek_ref},
                     num_heads, num_chunks, stages, reverse=True, parts=parts)
    wg = lax.axis_index("wg")
    f32_tile = smem["f32_smem"].at[wg]

    def write(c, grads):
        dv, dk = grads
        to_global([(dv, f32_tile, p.rows_of(dv_ref, c)), (dk, f32_tile, p.rows_of(dk_ref, c))], wait=False)

    @pl.when(wg == 0)
    def _walk():  # dv += (k u) dS, dk += (v u) dS^T, dS <- e^(g_L) dS + q^T (dy c)
        plgpu.set_max_registers(232, action="increase")
        grad = state_walk(smem, wg, p, ds_ref.at[p.program], cd_ref, [Readout("k", "ek"), Readout("v", "ek", True)],
                          ("q", "dy", "c"), lambda slot, results: results, write, stages=stages, interpret=interpret,
                          keep=lambda c, ds: _at_checkpoint(
                              c, num_chunks, interval, lambda m: to_global([(ds, f32_tile, kept_ref.at[p.head, m])])))
        to_global([(grad, f32_tile, ds0_ref.at[p.program])])
