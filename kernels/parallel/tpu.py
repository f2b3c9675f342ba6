"""Flash-style Pallas kernels for TPU (Mosaic); on CPU they run in the TPU interpret mode.

The same three kernels as ``triton.py``, with the same signatures and results, laid out for the TPU: a grid
(B*H, blocks, blocks) whose last axis is "arbitrary" and carries the accumulators in VMEM scratch; tiles above
the diagonal are skipped (``pl.when``) and their index maps clamped to the diagonal, so they are never fetched.
Per-token vectors travel as columns (BQ, 1) or rows (1, BK); the log-decay between two blocks is the sum of the
totals of the blocks between them, taken from one (1, nb) row (a short sum, never a difference of long cumsums).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from twomamba_jax.kernels.chunked.tiles import dot
from twomamba_jax.kernels.parallel.tiles import causal_diff, kv_head, tile_grads, weights
from twomamba_jax.ops.numerics import NORMALIZER_EPS

_F32 = jnp.float32


def _interpret(interpret: bool):
    return pltpu.InterpretParams(uninitialized_memory="nan") if interpret else False


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _between(totals_row, first, last):
    """The log-decay of blocks first .. last - 1, from the (1, nb) row of block totals: (1, 1)."""
    index = jax.lax.broadcasted_iota(jnp.int32, totals_row.shape, 1)
    inside = (index >= first) & (index < last)
    return jnp.sum(jnp.where(inside, totals_row, 0.0), axis=1, keepdims=True)


def _diff(g_rows, g_cols, i, j, block, totals_row):
    rows = i * block + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)
    cols = j * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
    return causal_diff(g_rows, g_cols, rows, cols, _between(totals_row, j, i))


class _Layout:
    """BlockSpecs and reshaped inputs shared by the three kernels."""

    def __init__(self, q, k, v, g_local, totals, block, num_heads, group):
        self.bh, self.padded, self.dk = q.shape
        self.dv, self.block = v.shape[-1], block
        self.num_blocks = self.padded // block
        self.kv = lambda h: kv_head(h, num_heads, group)
        self.columns = g_local.reshape(self.bh, self.padded, 1)
        self.rows = g_local.reshape(self.bh, self.num_blocks, 1, block)
        self.totals = totals.reshape(self.bh, 1, self.num_blocks)

    def tokens(self, width, which, kv=False):
        """Token tiles (BQ, width) of block ``which(i, j)`` (clamped to the diagonal by the caller)."""
        head = self.kv if kv else (lambda h: h)
        return pl.BlockSpec((None, self.block, width), lambda h, i, j: (head(h), which(i, j), 0))

    def row(self, which):
        return pl.BlockSpec((None, None, 1, self.block), lambda h, i, j: (h, which(i, j), 0, 0))

    def totals_spec(self):
        return pl.BlockSpec((None, 1, self.num_blocks), lambda h, i, j: (h, 0, 0))


def forward(q, k, v, g_local, totals, *, power, normalize, block, num_heads, group, y_dtype=None, interpret=False):
    """See ``triton.forward``: same arguments (bar the Triton tuning knobs), same results."""
    lay = _Layout(q, k, v, g_local, totals, block, num_heads, group)
    online_softmax = power == "exp" and normalize
    query, key = (lambda i, j: i), (lambda i, j: jnp.minimum(i, j))

    def kernel(q_ref, k_ref, v_ref, gc_ref, gr_ref, t_ref, y_ref, stat_ref, acc, den, running_max):
        i, j = pl.program_id(1), pl.program_id(2)

        @pl.when(j == 0)
        def _():
            acc[...] = jnp.zeros_like(acc)
            den[...] = jnp.zeros_like(den)
            running_max[...] = jnp.full_like(running_max, -jnp.inf)

        @pl.when(j <= i)
        def _():
            v_j = v_ref[...]
            diff = _diff(gc_ref[...], gr_ref[...], i, j, block, t_ref[...])
            s = dot(q_ref[...], k_ref[...], trans_b=True)
            if online_softmax:
                new_max = jnp.maximum(running_max[...], jnp.max(s + diff, axis=1, keepdims=True))
                p = weights(s, diff, power, new_max)
                rescale = jnp.exp(running_max[...] - new_max)
                acc[...] = acc[...] * rescale + dot(p.astype(v_j.dtype), v_j)
                den[...] = den[...] * rescale + jnp.sum(p, axis=1, keepdims=True)
                running_max[...] = new_max
            else:
                w = weights(s, diff, power).astype(v_j.dtype)  # the normalizer sums what the matmul reads
                acc[...] += dot(w, v_j)
                den[...] += jnp.sum(w.astype(_F32), axis=1, keepdims=True)

        @pl.when(j == lay.num_blocks - 1)
        def _():
            out = acc[...]
            if normalize:
                out = out / jnp.maximum(den[...], NORMALIZER_EPS)
            y_ref[...] = out.astype(y_ref.dtype)
            stat_ref[...] = running_max[...] + jnp.log(den[...]) if online_softmax else den[...]

    y, stat = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((lay.bh, lay.padded, lay.dv), y_dtype or v.dtype),
                   jax.ShapeDtypeStruct((lay.bh, lay.padded, 1), _F32)),
        grid=(lay.bh, lay.num_blocks, lay.num_blocks),
        in_specs=[lay.tokens(lay.dk, query), lay.tokens(lay.dk, key, kv=True), lay.tokens(lay.dv, key, kv=True),
                  lay.tokens(1, query), lay.row(key), lay.totals_spec()],
        out_specs=[lay.tokens(lay.dv, query), lay.tokens(1, query)],
        scratch_shapes=[pltpu.VMEM((block, lay.dv), _F32), pltpu.VMEM((block, 1), _F32),
                        pltpu.VMEM((block, 1), _F32)],
        compiler_params=_params(), interpret=_interpret(interpret), name="twomamba_parallel_forward",
    )(q, k, v, lay.columns, lay.rows, lay.totals)
    return y, stat.reshape(lay.bh, lay.padded)


def backward_dq(q, k, v, g_local, totals, d_out, stat, delta, *, power, normalize, block, num_heads, group,
                interpret=False):
    """See ``triton.backward_dq``."""
    lay = _Layout(q, k, v, g_local, totals, block, num_heads, group)
    query, key = (lambda i, j: i), (lambda i, j: jnp.minimum(i, j))

    def kernel(q_ref, k_ref, v_ref, gc_ref, gr_ref, t_ref, do_ref, st_ref, dl_ref, dq_ref, dg_ref, dq, d_gamma):
        i, j = pl.program_id(1), pl.program_id(2)

        @pl.when(j == 0)
        def _():
            dq[...] = jnp.zeros_like(dq)
            d_gamma[...] = jnp.zeros_like(d_gamma)

        @pl.when(j <= i)
        def _():
            q_i, k_j = q_ref[...], k_ref[...]
            diff = _diff(gc_ref[...], gr_ref[...], i, j, block, t_ref[...])
            s = dot(q_i, k_j, trans_b=True)
            d_out_dot_v = dot(do_ref[...].astype(q_i.dtype), v_ref[...], trans_b=True)
            _, d_s, through_decay = tile_grads(s, diff, d_out_dot_v, st_ref[...], dl_ref[...], power, normalize)
            dq[...] += dot(d_s.astype(k_j.dtype), k_j)
            d_gamma[...] += jnp.sum(through_decay, axis=1, keepdims=True)

        @pl.when(j == lay.num_blocks - 1)
        def _():
            dq_ref[...] = dq[...]
            dg_ref[...] = d_gamma[...]

    dq, d_gamma = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((lay.bh, lay.padded, lay.dk), _F32),
                   jax.ShapeDtypeStruct((lay.bh, lay.padded, 1), _F32)),
        grid=(lay.bh, lay.num_blocks, lay.num_blocks),
        in_specs=[lay.tokens(lay.dk, query), lay.tokens(lay.dk, key, kv=True), lay.tokens(lay.dv, key, kv=True),
                  lay.tokens(1, query), lay.row(key), lay.totals_spec(), lay.tokens(lay.dv, query),
                  lay.tokens(1, query), lay.tokens(1, query)],
        out_specs=[lay.tokens(lay.dk, query), lay.tokens(1, query)],
        scratch_shapes=[pltpu.VMEM((block, lay.dk), _F32), pltpu.VMEM((block, 1), _F32)],
        compiler_params=_params(), interpret=_interpret(interpret), name="twomamba_parallel_dq",
    )(q, k, v, lay.columns, lay.rows, lay.totals, d_out, stat.reshape(lay.bh, lay.padded, 1),
      delta.reshape(lay.bh, lay.padded, 1))
    return dq, d_gamma.reshape(lay.bh, lay.padded)


def backward_dkv(q, k, v, g_local, totals, d_out, stat, delta, *, power, normalize, block, num_heads, group,
                 interpret=False):
    """See ``triton.backward_dkv``: grid (B*H, key blocks, query blocks), the query axis "arbitrary"."""
    lay = _Layout(q, k, v, g_local, totals, block, num_heads, group)
    # Here the grid is (head, j, i): program axis 1 is the key block, axis 2 the query block.
    key, query = (lambda j, i: j), (lambda j, i: jnp.maximum(i, j))

    def kernel(q_ref, k_ref, v_ref, gc_ref, gr_ref, t_ref, do_ref, st_ref, dl_ref, dk_ref, dv_ref, dg_ref,
               dk_acc, dv_acc, d_gamma):
        j, i = pl.program_id(1), pl.program_id(2)

        @pl.when(i == 0)
        def _():
            dk_acc[...] = jnp.zeros_like(dk_acc)
            dv_acc[...] = jnp.zeros_like(dv_acc)
            d_gamma[...] = jnp.zeros_like(d_gamma)

        @pl.when(i >= j)
        def _():
            q_i, k_j = q_ref[...], k_ref[...]
            d_out_i = do_ref[...].astype(q_i.dtype)
            diff = _diff(gc_ref[...], gr_ref[...], i, j, block, t_ref[...])
            s = dot(q_i, k_j, trans_b=True)
            d_out_dot_v = dot(d_out_i, v_ref[...], trans_b=True)
            seen, d_s, through_decay = tile_grads(s, diff, d_out_dot_v, st_ref[...], dl_ref[...], power,
                                                   normalize)
            dv_acc[...] += dot(seen.T.astype(d_out_i.dtype), d_out_i)
            dk_acc[...] += dot(d_s.T.astype(q_i.dtype), q_i)
            d_gamma[...] += jnp.sum(through_decay.T, axis=1, keepdims=True)

        @pl.when(i == lay.num_blocks - 1)
        def _():
            dk_ref[...] = dk_acc[...]
            dv_ref[...] = dv_acc[...]
            dg_ref[...] = d_gamma[...]

    by_key = lambda width: pl.BlockSpec((None, block, width), lambda h, j, i: (h, j, 0))
    dk, dv, d_gamma = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((lay.bh, lay.padded, lay.dk), _F32),
                   jax.ShapeDtypeStruct((lay.bh, lay.padded, lay.dv), _F32),
                   jax.ShapeDtypeStruct((lay.bh, lay.padded, 1), _F32)),
        grid=(lay.bh, lay.num_blocks, lay.num_blocks),
        in_specs=[lay.tokens(lay.dk, query), lay.tokens(lay.dk, key, kv=True), lay.tokens(lay.dv, key, kv=True),
                  lay.tokens(1, query), lay.row(key), lay.totals_spec(), lay.tokens(lay.dv, query),
                  lay.tokens(1, query), lay.tokens(1, query)],
        out_specs=[by_key(lay.dk), by_key(lay.dv), by_key(1)],
        scratch_shapes=[pltpu.VMEM((block, lay.dk), _F32), pltpu.VMEM((block, lay.dv), _F32),
                        pltpu.VMEM((block, 1), _F32)],
        compiler_params=_params(), interpret=_interpret(interpret), name="twomamba_parallel_dkv",
    )(q, k, v, lay.columns, lay.rows, lay.totals, d_out, stat.reshape(lay.bh, lay.padded, 1),
      delta.reshape(lay.bh, lay.padded, 1))
    return dk, dv, d_gamma.reshape(lay.bh, lay.padded)
