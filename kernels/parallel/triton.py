"""Flash-style Pallas kernels for the Triton lowering (GPU); they run in interpret mode on CPU.

Three launches, as in FlashAttention-2: ``forward`` (grid (B*H, query blocks): each program walks its key blocks
from the diagonal back to the first, accumulating in registers), ``backward_dq`` (the same walk, for dq and the
row half of the log-decay cotangent) and ``backward_dkv`` (grid (B*H, key blocks): each program walks the query
blocks from the diagonal to the last, for dk, dv and the column half). Blocks above the diagonal are never
visited. Queries are pre-scaled; with grouped keys (GQA) query head h reads key head h // group, and dk, dv come
out per query head (the caller sums each group).

Log-decays arrive as cumulative sums local to each block plus each block's total: walking away from the diagonal,
a program adds the totals of the blocks it passes, so ``g_i - g_j`` is always a short sum and never the
difference of two long cumulative sums. Everything but matmul operands is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from twomamba_jax.kernels.chunked.tiles import dot
from twomamba_jax.kernels.parallel.tiles import causal_diff, kv_head, tile_grads, weights
from twomamba_jax.ops.numerics import NORMALIZER_EPS


def _params(num_warps, num_stages):
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _positions(block_index, block):
    return block_index * block + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)


def forward(q, k, v, g_local, totals, *, power, normalize, block, num_heads, group, y_dtype=None, interpret=False,
            num_warps=4, num_stages=2):
    """q: (BH, Np, dk) pre-scaled; k: (BH / group, Np, dk); v: (BH / group, Np, dv); g_local: (BH, Np) float32
    block-local cumulative log-decays; totals: (BH, nb) each block's log-decay. Returns y (BH, Np, dv) in
    ``y_dtype`` (default v's) and a per-token statistic (BH, Np) float32 for the backward: the log-normalizer for
    normalized exp, the normalizer otherwise (summed from the weights as the matmul reads them)."""
    bh, padded, _ = q.shape
    dv = v.shape[-1]
    online_softmax = power == "exp" and normalize

    def kernel(q_ref, k_ref, v_ref, g_ref, t_ref, y_ref, stat_ref):
        head, i = pl.program_id(0), pl.program_id(1)
        kv = kv_head(head, num_heads, group)
        rows = pl.ds(i * block, block)
        q_i, g_i = q_ref[head, rows, :], g_ref[head, rows]
        row_positions = _positions(i, block)[:, None]

        def visit(t, carry):
            acc, den, running_max, offset = carry
            j = i - t
            cols = pl.ds(j * block, block)
            v_j = v_ref[kv, cols, :]
            diff = causal_diff(g_i[:, None], g_ref[head, cols][None, :], row_positions,
                               _positions(j, block)[None, :], offset)
            s = dot(q_i, k_ref[kv, cols, :], trans_b=True)
            if online_softmax:
                new_max = jnp.maximum(running_max, jnp.max(s + diff, axis=1))
                p = weights(s, diff, power, new_max[:, None])
                rescale = jnp.exp(running_max - new_max)
                acc = acc * rescale[:, None] + dot(p.astype(v_j.dtype), v_j)
                den = den * rescale + jnp.sum(p, axis=1)
                running_max = new_max
            else:
                w = weights(s, diff, power).astype(v_j.dtype)
                acc = acc + dot(w, v_j)
                den = den + jnp.sum(w.astype(jnp.float32), axis=1)
            offset = offset + t_ref[head, jnp.maximum(j - 1, 0)]  # the block the walk enters next
            return acc, den, running_max, offset

        init = (jnp.zeros((block, dv), jnp.float32), jnp.zeros((block,), jnp.float32),
                jnp.full((block,), -jnp.inf, jnp.float32), jnp.zeros((), jnp.float32))
        acc, den, running_max, _ = jax.lax.fori_loop(0, i + 1, visit, init)
        if normalize:
            acc = acc / jnp.maximum(den, NORMALIZER_EPS)[:, None]
        y_ref[head, rows, :] = acc.astype(y_ref.dtype)
        stat_ref[head, rows] = running_max + jnp.log(den) if online_softmax else den

    out_shape = (jax.ShapeDtypeStruct((bh, padded, dv), y_dtype or v.dtype),
                 jax.ShapeDtypeStruct((bh, padded), jnp.float32))
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(bh, padded // block), interpret=interpret,
                          compiler_params=_params(num_warps, num_stages), name="twomamba_parallel_forward")(
        q, k, v, g_local, totals)


def backward_dq(q, k, v, g_local, totals, d_out, stat, delta, *, power, normalize, block, num_heads, group,
                interpret=False, num_warps=4, num_stages=2):
    """dq (of the pre-scaled q) and the row sums of the log-decay cotangent, (BH, Np, dk) and (BH, Np) float32.

    d_out: (BH, Np, dv) float32; stat: the forward's statistic (the normalizer clipped at eps for powers);
    delta: (BH, Np) ``dy . y`` for normalized outputs."""
    bh, padded, dk = q.shape

    def kernel(q_ref, k_ref, v_ref, g_ref, t_ref, do_ref, st_ref, dl_ref, dq_ref, dg_ref):
        head, i = pl.program_id(0), pl.program_id(1)
        kv = kv_head(head, num_heads, group)
        rows = pl.ds(i * block, block)
        q_i, g_i = q_ref[head, rows, :], g_ref[head, rows]
        d_out_i = do_ref[head, rows, :].astype(q_i.dtype)
        stat_i, delta_i = st_ref[head, rows][:, None], dl_ref[head, rows][:, None]
        row_positions = _positions(i, block)[:, None]

        def visit(t, carry):
            dq, d_gamma, offset = carry
            j = i - t
            cols = pl.ds(j * block, block)
            k_j = k_ref[kv, cols, :]
            diff = causal_diff(g_i[:, None], g_ref[head, cols][None, :], row_positions,
                               _positions(j, block)[None, :], offset)
            s = dot(q_i, k_j, trans_b=True)
            d_out_dot_v = dot(d_out_i, v_ref[kv, cols, :], trans_b=True)
            _, d_s, through_decay = tile_grads(s, diff, d_out_dot_v, stat_i, delta_i, power, normalize)
            dq = dq + dot(d_s.astype(k_j.dtype), k_j)
            d_gamma = d_gamma + jnp.sum(through_decay, axis=1)
            return dq, d_gamma, offset + t_ref[head, jnp.maximum(j - 1, 0)]

        init = (jnp.zeros((block, dk), jnp.float32), jnp.zeros((block,), jnp.float32), jnp.zeros((), jnp.float32))
        dq, d_gamma, _ = jax.lax.fori_loop(0, i + 1, visit, init)
        dq_ref[head, rows, :] = dq
        dg_ref[head, rows] = d_gamma

    out_shape = (jax.ShapeDtypeStruct((bh, padded, dk), jnp.float32), jax.ShapeDtypeStruct((bh, padded), jnp.float32))
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(bh, padded // block), interpret=interpret,
                          compiler_params=_params(num_warps, num_stages), name="twomamba_parallel_dq")(
        q, k, v, g_local, totals, d_out, stat, delta)


def backward_dkv(q, k, v, g_local, totals, d_out, stat, delta, *, power, normalize, block, num_heads, group,
                 interpret=False, num_warps=4, num_stages=2):
    """dk, dv per query head ((BH, Np, dk), (BH, Np, dv) float32) and the column sums of the log-decay cotangent
    (BH, Np); arguments as ``backward_dq``."""
    bh, padded, dk = q.shape
    dv = v.shape[-1]
    num_blocks = padded // block

    def kernel(q_ref, k_ref, v_ref, g_ref, t_ref, do_ref, st_ref, dl_ref, dk_ref, dv_ref, dg_ref):
        head, j = pl.program_id(0), pl.program_id(1)
        kv = kv_head(head, num_heads, group)
        cols = pl.ds(j * block, block)
        k_j, v_j, g_j = k_ref[kv, cols, :], v_ref[kv, cols, :], g_ref[head, cols]
        col_positions = _positions(j, block)[None, :]

        def visit(t, carry):
            dk_j, dv_j, d_gamma, offset = carry
            i = j + t
            rows = pl.ds(i * block, block)
            q_i = q_ref[head, rows, :]
            d_out_i = do_ref[head, rows, :].astype(q_i.dtype)
            diff = causal_diff(g_ref[head, rows][:, None], g_j[None, :], _positions(i, block)[:, None],
                               col_positions, offset)
            s = dot(q_i, k_j, trans_b=True)
            d_out_dot_v = dot(d_out_i, v_j, trans_b=True)
            seen, d_s, through_decay = tile_grads(s, diff, d_out_dot_v, st_ref[head, rows][:, None],
                                                   dl_ref[head, rows][:, None], power, normalize)
            dv_j = dv_j + dot(seen.T.astype(d_out_i.dtype), d_out_i)
            dk_j = dk_j + dot(d_s.T.astype(q_i.dtype), q_i)
            d_gamma = d_gamma + jnp.sum(through_decay, axis=0)
            return dk_j, dv_j, d_gamma, offset + t_ref[head, i]  # the query block just passed

        init = (jnp.zeros((block, dk), jnp.float32), jnp.zeros((block, dv), jnp.float32),
                jnp.zeros((block,), jnp.float32), jnp.zeros((), jnp.float32))
        dk_j, dv_j, d_gamma, _ = jax.lax.fori_loop(0, num_blocks - j, visit, init)
        dk_ref[head, cols, :] = dk_j
        dv_ref[head, cols, :] = dv_j
        dg_ref[head, cols] = d_gamma

    f32 = jnp.float32
    out_shape = (jax.ShapeDtypeStruct((bh, padded, dk), f32), jax.ShapeDtypeStruct((bh, padded, dv), f32),
                 jax.ShapeDtypeStruct((bh, padded), f32))
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(bh, num_blocks), interpret=interpret,
                          compiler_params=_params(num_warps, num_stages), name="twomamba_parallel_dkv")(
        q, k, v, g_local, totals, d_out, stat, delta)
