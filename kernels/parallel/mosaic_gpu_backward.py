"""Flash-style backward kernel for Hopper GPUs in Mosaic GPU: every matmul on wgmma, tiles by TMA into a ring of
shared-memory slots filled by a memory warpgroup, two compute warpgroups of 64 rows each (as the forward in
``mosaic_gpu.py``, whose module docstring gives the decay bookkeeping).

``backward`` runs one kernel (``_fused_kernel``): each compute warpgroup owns 64 keys and walks 64-token query tiles
(and 64-token decay blocks) from the diagonal forward, holding dk, dv and the diagonal's dk in registers besides the
two score tiles (with 128-token query tiles those spilled, ~1.2 KB a thread, and the dk/dv work ran 30% slower on
the H200). It also makes dq, as FlashAttention-3 does: dS goes through shared memory into a fifth matmul with the
warpgroup's keys, and the (64, dk) product is added into a float32 dq in global memory by a TMA reduction (dq's sums
run in no fixed order: not bitwise reproducible from run to run). The row sums of T that the log-decay cotangent
needs are not summed per tile (a sum over a tile's keys crosses warps, through scratch that the two warpgroups would
share) but come from the accumulators or a matmul (see ``backward``). It reads and writes token-major (B, N, H, d)
tiles; dq, dk, dv leave in the operands' dtypes.

Per tile, with W the weights, dW their cotangent and T = dW * W the log-decay cotangent (its row sums and column
sums give the per-token cotangent):

- normalized powers divide by the normalizer: dy and delta arrive divided by it, so dW = dy'.v - delta' and
  dv = W^T dy' as for unnormalized ones;
- off-diagonal power tiles use the folded q' = scale q exp(g/p), k' = k exp(kd/p): with c = exp(r), W = s'^p c and
  dq = p exp(g_i/p) (dW c s'^(p-1)) k', dk = p exp(kd_j/p) (dW c s'^(p-1))^T q', so the scale factors are applied
  once per row at the end (by XLA, after the kernel); diagonal tiles use the unscaled q, k (s = scale q.k) with a
  masked decay;
- exp: W = exp2(s + g_i + kd_j + r - L_i) with s = scale log2(e) q.k and L the forward's log-normalizer (0 when
  unnormalized), ds = dW * W.
Accumulators are updated in place by wgmma on the GPU (``matmul_into``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from twomamba_jax.kernels.layout import heads_first
from twomamba_jax.kernels.parallel.mosaic_gpu import (BLOCK, LOG2E, ROWS_PER_PROGRAM, causal_mask, head_indices,
                                                      interpret_params, launch, matmul, matmul_into, operands,
                                                      ring_copies, rows_plus_cols, scratch_types, smem_tile, stream)

_WGMMA = plgpu.Layout.WGMMA


def backward(q, k, v, g_local, totals, d_out, stat, delta, *, power, normalize, scale, stages=2, interpret=False):
    """Gradients of the flash-style attention on token-major operands: (dq, dk, dv, row sums, column sums).

    q, k, v, g_local, totals as ``mosaic_gpu.forward`` takes them (128-token decay blocks); d_out: (B, Np, H, dv)
    the output's cotangent; stat: (B H, Np) the forward's statistic (for normalized powers clipped at eps); delta:
    (B H, Np) ``dy . y`` (0 where the normalizer was clipped, 0 when unnormalized). Returns dq (B, Np, H, dk) in
    q's dtype, dk, dv (B, Np, Hk, d) in k's and v's dtypes, and the row and column sums of the log-decay cotangent
    (B H, Np) float32.

    The row and column sums of T: for powers from the accumulators, as T = dS * s with s = q'.k' off the diagonal,
    so sum_j T_ij = q'_i . (sum_j dS_ij k'_j) = q'_i . dq'_i, and likewise for the columns and the diagonal
    (s = scale q.k); for exp (T = dS) by the kernel, the rows through a matmul with a tile of ones. Both from the
    same dS as rounded for the matmuls, so that they cancel in the log-decay cotangent as they should.
    """
    batch, padded, heads, dk = q.shape
    if padded % ROWS_PER_PROGRAM:
        raise ValueError(f"q: the Mosaic GPU kernels take whole {ROWS_PER_PROGRAM}-row programs; got {q.shape}")
    kv_heads, dv, dtype = k.shape[2], v.shape[-1], q.dtype
    group = heads // kv_heads
    folded = power != "exp"
    if folded and normalize:  # dW = (dy.v - delta) / den: fold the division into dy and delta
        per_token = stat.reshape(batch, heads, padded).transpose(0, 2, 1)[..., None]
        d_out, delta = d_out.astype(jnp.float32) / per_token, delta / stat
    log_normalizer = stat * LOG2E if power == "exp" and normalize else jnp.zeros_like(stat)
    interpret = interpret_params(interpret)
    d_out = d_out.astype(dtype)
    f32 = jnp.float32
    g64, totals64 = _halve_blocks(g_local, totals)
    q_main, k_main, key_decay, g_rows, block_totals = operands(q, k, g64, totals64, power=power, scale=scale)
    args = (q_main, k_main, v, key_decay, g_rows, block_totals, q, k, d_out, log_normalizer, delta)
    ring = {"q": ((BLOCK, dk), dtype), "dy": ((BLOCK, dv), dtype), "g": ((BLOCK,), f32), "lse": ((BLOCK,), f32),
            "delta": ((BLOCK,), f32)}
    own = {"k": ((BLOCK, dk), dtype), "v": ((BLOCK, dv), dtype), "kd": ((BLOCK,), f32)}
    if folded:  # the diagonal's unscaled q and k
        own.update(q_diag=((BLOCK, dk), dtype), k_diag=((BLOCK, dk), dtype))
        del ring["lse"]
    scratch = scratch_types(ring, own, stages, dtype, interpret, staging_cols=BLOCK)
    dv_dtype = v.dtype if group == 1 else f32  # per query head: summed over the group after, in float32
    scratch.update(ds_smem=smem_tile((2, BLOCK, BLOCK), dtype), f32_smem=smem_tile((2, BLOCK, max(dk, dv)), f32),
                   dv_smem=smem_tile((2, BLOCK, dv), dv_dtype))
    if not folded:
        scratch.update(ones_smem=smem_tile((2, BLOCK, BLOCK), dtype), rows_smem=plgpu.SMEM((2, BLOCK), f32),
                       cols_smem=plgpu.SMEM((2, BLOCK), f32))
    if interpret:  # the interpreter has no TMA reductions: read, add and write back through these
        scratch.update(sum_smem=smem_tile((2, BLOCK, dk), f32), rows_sum_smem=plgpu.SMEM((2, BLOCK), f32),
                       sum_bar=plgpu.Barrier(num_barriers=2))
    per_query_head = lambda d, kind=f32: jax.ShapeDtypeStruct((batch, padded, heads, d), kind)
    out_type = (per_query_head(dk), per_query_head(dk), per_query_head(dv, dv_dtype), per_query_head(dk))
    if not folded:
        out_type += (jax.ShapeDtypeStruct((batch * heads, padded), f32),)
    kernel = functools.partial(_fused_kernel, power=power, scale=scale, num_heads=heads, group=group,
                               stages=stages, dk=dk, num_blocks=padded // BLOCK)
    run = launch("twomamba_mosaic_backward", kernel, out_type, scratch, batch * heads, padded, interpret)
    # Zeroed float32 accumulators that the kernel adds into, one per compute warpgroup.
    dq_off, d_rows = (jax.new_ref(jnp.zeros((2, *shape), f32))
                      for shape in ((batch, padded, heads, dk), (batch * heads, padded)))
    dk_off, dk_diag, dv_, dq_diag, *d_cols = run(*args, dq_off, d_rows)
    dq_off, d_rows = dq_off[...].sum(0), d_rows[...].sum(0)

    if folded:
        per_token = lambda x: x.reshape(batch, heads, padded).transpose(0, 2, 1)[..., None]  # -> (B, Np, H, 1)
        dot = lambda a, b: heads_first(jnp.sum(a.astype(f32) * b, axis=-1), padded)
        d_rows = dot(q_main, dq_off) + scale * dot(q, dq_diag)
        d_cols = dot(k_main, dk_off) + scale * dot(jnp.repeat(k, group, axis=2), dk_diag)
        # Against q' and k': times p exp(decay / p) row by row (the decays in base 2); the diagonal's times p.
        dq = (dq_off * (power * jnp.exp2(per_token(g_rows) / power)) + power * dq_diag) * scale
        dk_ = dk_off * (power * jnp.exp2(per_token(key_decay) / power)) + dk_diag * (power * scale)
    else:  # the logits are scale log2(e) q.k and W = exp2(logits): dW/dq = W scale k
        [d_cols] = d_cols
        dq, dk_ = (dq_off + dq_diag) * scale, (dk_off + dk_diag) * scale
    dk_ = dk_.reshape(batch, padded, kv_heads, group, dk).sum(3)
    dv_ = dv_.reshape(batch, padded, kv_heads, group, dv).sum(3)
    return dq.astype(dtype), dk_.astype(k.dtype), dv_.astype(v.dtype), d_rows, d_cols


def _fused_kernel(q_ref, k_ref, v_ref, kd_ref, g_ref, t_ref, q_diag_ref, k_diag_ref, dy_ref, lse_ref, delta_ref,
                  dq_off_ref, rows_ref, dk_off_ref, dk_diag_ref, dv_ref, dq_diag_ref, cols_ref=None, *, power, scale,
                  num_heads, group, stages, dk, num_blocks, **smem):
    """Each compute warpgroup owns 64 keys and walks 64-token query tiles from its diagonal on; besides dk and dv
    it multiplies each tile's dS (through shared memory) by its keys: off the diagonal the (64, dk) product is
    added into ``dq_off_ref[wg]`` (a TMA reduction), the diagonal's (for powers against the unscaled keys) is
    stored to ``dq_diag_ref`` (one tile per query block). dk leaves unscaled, as its off-diagonal and diagonal
    parts. exp also adds each tile's row sums of T into ``rows_ref[wg]`` and writes the column sums."""
    head, batch, query_head, key_head = head_indices(num_heads, group)
    program, wg = lax.axis_index("rows"), lax.axis_index("wg")
    folded = power != "exp"
    first_tile = 2 * program
    walk = num_blocks - first_tile
    ring = [(name, lambda rows, src=src: src.at[batch, rows, query_head], None)
            for name, src in (("q", q_ref), ("dy", dy_ref))]
    ring += [(name, lambda rows, src=src: src.at[head, rows], None)
             for name, src in (("g", g_ref), ("lse", lse_ref), ("delta", delta_ref)) if f"{name}_smem" in smem]
    issue, wait_tile = ring_copies(ring, smem, lambda step: first_tile + step, None, BLOCK)

    pl.when(wg == 2)(lambda: stream(walk, stages, smem["consumed_bar"], issue))

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        block = first_tile + wg  # this warpgroup's key block
        cols = pl.ds(block * BLOCK, BLOCK)
        own = [(k_ref.at[batch, cols, query_head if folded else key_head], smem["k_smem"], smem["k_bar"]),
               (v_ref.at[batch, cols, key_head], smem["v_smem"], smem["v_bar"]),
               (kd_ref.at[head, cols], smem["kd_smem"], smem["kd_bar"])]
        if folded:
            own += [(q_diag_ref.at[batch, cols, query_head], smem["q_diag_smem"], smem["q_diag_bar"]),
                    (k_diag_ref.at[batch, cols, key_head], smem["k_diag_smem"], smem["k_diag_bar"])]
        else:  # rows of ones: dS^T times them gives T's row sums (exp: T = dS) in every column
            smem["ones_smem"].at[wg][...] = plgpu.layout_cast(jnp.ones((BLOCK, BLOCK), q_ref.dtype), _WGMMA)
            plgpu.commit_smem()
        _load_own(wg, own)
        kd_row = plgpu.load(smem["kd_smem"].at[wg], layout=_WGMMA.reduce(1))
        staging = smem["staging_smem"].at[wg] if "staging_smem" in smem else None
        ds_smem = smem["ds_smem"].at[wg]
        totals = {name: (smem[f"{name}sum_smem"].at[wg], smem["sum_bar"].at[wg])
                  for name in ("", "rows_") if f"{name}sum_smem" in smem}
        tile = (BLOCK, BLOCK)
        col = functools.partial(plgpu.load, layout=_WGMMA.reduce(0))

        def visit(step, carry, diagonal):
            dk_acc, dk_diag, dv_acc, d_cols, r = carry
            slot = lax.rem(step, jnp.int32(stages))
            wait_tile(slot)
            q_tile, dy_tile = smem["q_smem"].at[slot], smem["dy_smem"].at[slot]
            g_col, delta = col(smem["g_smem"].at[slot]), col(smem["delta_smem"].at[slot])
            lse = None if folded else col(smem["lse_smem"].at[slot])
            unscaled = diagonal and folded
            keys = smem["k_diag_smem" if unscaled else "k_smem"].at[wg]
            queries = smem["q_diag_smem"].at[wg] if unscaled else q_tile
            s = matmul(keys, queries.transpose((1, 0)), tile)
            s = s * scale if unscaled else _logits(s, power, scale)
            dp = matmul(smem["v_smem"].at[wg], dy_tile.transpose((1, 0)), tile)
            w, d_s, _ = _weights_and_grads(s, dp, rows_plus_cols(kd_row + r, g_col, tile), r, delta, lse,
                                           power=power, diagonal=diagonal, transposed=True, row_offset=0)
            dv_acc = matmul_into(dv_acc, w.astype(dy_tile.dtype), dy_tile, staging)
            d_s = d_s.astype(q_tile.dtype)
            if diagonal:
                dk_diag = matmul_into(dk_diag, d_s, queries, staging)
            else:
                dk_acc = matmul_into(dk_acc, d_s, queries, staging)
            ds_smem[...] = d_s
            plgpu.commit_smem()
            ds_t = ds_smem.transpose((1, 0))  # (queries, keys)
            rows = pl.ds((first_tile + step) * BLOCK, BLOCK)
            outputs = [(matmul(ds_t, keys, (BLOCK, dk)), smem["f32_smem"].at[wg],
                        dq_diag_ref.at[batch, rows, query_head] if diagonal
                        else dq_off_ref.at[wg, batch, rows, query_head], not diagonal, totals.get(""))]
            if not folded:
                d_cols = d_cols + d_s.astype(jnp.float32).sum(axis=1)
                row_sums = matmul(ds_t, smem["ones_smem"].at[wg], tile).max(axis=1)  # every column the same
                outputs.append((row_sums, smem["rows_smem"].at[wg], rows_ref.at[wg, head, rows], True,
                                totals.get("rows_")))
            plgpu.barrier_arrive(smem["consumed_bar"].at[slot])
            _to_global(outputs)
            return dk_acc, dk_diag, dv_acc, d_cols, r + t_ref[head, first_tile + step]

        @pl.when(wg == 1)  # query tile 2p precedes this warpgroup's keys
        def _():
            wait_tile(0)
            plgpu.barrier_arrive(smem["consumed_bar"].at[0])

        zeros = lambda d: plgpu.layout_cast(jnp.zeros((BLOCK, d), jnp.float32), _WGMMA)
        carry = (zeros(dk), zeros(dk), zeros(dv_ref.shape[-1]),
                 plgpu.layout_cast(jnp.zeros((BLOCK,), jnp.float32), _WGMMA.reduce(1)), -t_ref[head, block])
        carry = visit(wg, carry, diagonal=True)
        dk_acc, dk_diag, dv_acc, d_cols, _ = lax.fori_loop(wg + 1, walk, functools.partial(visit, diagonal=False),
                                                           carry)
        f32_smem = smem["f32_smem"].at[wg]
        _to_global([(dk_acc, f32_smem, dk_off_ref.at[batch, cols, query_head], False, None)])
        _to_global([(dk_diag, f32_smem, dk_diag_ref.at[batch, cols, query_head], False, None)]
                   + ([] if folded else [(d_cols, smem["cols_smem"].at[wg], cols_ref.at[head, cols], False, None)]))
        _to_global([(dv_acc, smem["dv_smem"].at[wg], dv_ref.at[batch, cols, query_head], False, None)])
        plgpu.wait_smem_to_gmem(0)


def _to_global(outputs):
    """Each ``(value, smem, dst, add, total)``: ``value`` -> ``smem`` (once the copies before have left shared
    memory) -> global ``dst``, added to it when ``add``: a TMA reduction on the GPU; the interpreter has none, so
    there (``total`` = (a tile like ``smem``, a barrier)) ``dst`` is read, added to and written back (the warpgroup
    is the only writer of ``dst`` while its program runs, and the interpreter runs programs one at a time)."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    interpret = any(add and total is not None for _, _, _, add, total in outputs)
    for value, smem, dst, add, total in outputs:
        if add and total is not None:
            tile, bar = total
            plgpu.copy_gmem_to_smem(dst, tile, bar)
            plgpu.barrier_wait(bar)
            value = value + tile[...]
        smem[...] = value.astype(smem.dtype)
    plgpu.commit_smem()
    for _, smem, dst, add, total in outputs:
        plgpu.copy_smem_to_gmem(smem, dst, reduction_op="add" if add and total is None else None)
    if interpret:
        plgpu.wait_smem_to_gmem(0)


def _halve_blocks(g_local, totals):
    """(g_local, totals) of 128-token decay blocks -> the same of 64-token ones."""
    g = g_local.reshape(totals.shape[0], -1, 2, BLOCK)
    first = g[:, :, 0, -1]
    g = jnp.stack([g[:, :, 0], g[:, :, 1] - first[..., None]], axis=2)
    return g.reshape(g_local.shape), jnp.stack([first, totals - first], axis=-1).reshape(totals.shape[0], -1)


def _load_own(wg, copies):
    """This warpgroup's own tiles: start every copy, then wait for all of them."""
    for src, smem, bar in copies:
        plgpu.copy_gmem_to_smem(src, smem.at[wg], bar.at[wg])
    for _, _, bar in copies:
        plgpu.barrier_wait(bar.at[wg])


def _weights_and_grads(s, dp, log_decay, r, delta, lse, *, power, diagonal, transposed, row_offset):
    """(W, dS, T) of one tile: W as the value cotangent sees it, dS the score cotangent to multiply by the other
    operand (for off-diagonal power tiles the folded one, scaled at the end), T = dW * W. ``row_offset``: the
    first row's index in the diagonal block (the tile's columns start at its beginning)."""
    shape = s.shape
    along = [1] if transposed else [0]  # the query axis of the tile
    delta = lax.broadcast_in_dim(delta, shape, along)
    mask = causal_mask(shape, transposed, row_offset) if diagonal else None
    if power == "exp":
        logits = s + log_decay - lax.broadcast_in_dim(lse, shape, along)
        if diagonal:
            logits = jnp.where(mask, logits, -jnp.inf)
        w = jnp.exp2(logits)
        d_s = (dp - delta) * w
        return w, d_s, d_s
    if diagonal:
        decay = jnp.exp2(jnp.where(mask, jnp.minimum(log_decay, 0.0), -jnp.inf))
    else:
        decay = jnp.exp2(r)  # one scalar: the folded operands carry the rest
    d_w = dp - delta
    w = (s if power == 1 else s * s) * decay
    d_s = d_w * decay if power == 1 else d_w * decay * s  # times p (and, off the diagonal, the row scale) later
    return w, d_s, d_w * w


def _logits(s, power, scale):
    """An off-diagonal tile's scores: base-2 logits ``scale log2(e) q.k`` for exp; as they are for folded powers
    (q' carries the scale)."""
    return s * (scale * LOG2E) if power == "exp" else s
