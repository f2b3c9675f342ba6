"""Flash-style backward kernels for Hopper GPUs in Mosaic GPU: every matmul on wgmma, tiles by TMA into a ring of
shared-memory slots filled by a memory warpgroup, two compute warpgroups of 64 rows each (as the forward in
``mosaic_gpu.py``, whose module docstring gives the decay bookkeeping).

``backward_dq`` walks the key tiles from the diagonal back (as the forward); ``backward_dkv`` owns 64 keys per
compute warpgroup and walks the query tiles from the diagonal forward. Per tile, with W the weights, dW their
cotangent and T = dW * W the log-decay cotangent (its row sums and column sums give the per-token cotangent):

- normalized powers divide by the normalizer: dy and delta arrive divided by it, so dW = dy'.v - delta' and
  dv = W^T dy' as for unnormalized ones;
- off-diagonal power tiles use the folded q' = q exp(g/p), k' = k exp(kd/p): with c = exp(r),
  W = s'^p c and dq = p exp(g_i/p) (dW c s'^(p-1)) k', dk = p exp(kd_j/p) (dW c s'^(p-1))^T q', so the scale
  factors are applied once per row at the end; diagonal tiles use the unscaled q, k with a masked decay;
- exp: W = exp2(s + g_i + kd_j + r - L_i) with L the forward's log-normalizer (0 when unnormalized), ds = dW * W.

Signatures and outputs match ``triton.backward_dq`` / ``triton.backward_dkv``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from twomamba_jax.kernels.parallel.mosaic_gpu import (BLOCK, LOG2E, ROWS_PER_PROGRAM, causal_mask, interpret_params,
                                                      launch, matmul, operands, rows_plus_cols, scratch_types,
                                                      smem_tile, stream)
from twomamba_jax.kernels.parallel.tiles import kv_head

_WGMMA = plgpu.Layout.WGMMA


def _backward(name, body, ring, own, outputs, q, k, v, g_local, totals, d_out, stat, delta, *, power, normalize,
              num_heads, group, interpret, stages):
    """Launches ``body`` over (query head, 128-row program) with ``ring`` (name -> per-step tile) streamed by the
    memory warpgroup, ``own`` tiles per compute warpgroup and ``outputs`` (name -> per-token shape) float32."""
    bh, padded, dk = q.shape
    if padded % ROWS_PER_PROGRAM:
        raise ValueError(f"q: the Mosaic GPU kernels take whole {ROWS_PER_PROGRAM}-row programs; got {q.shape}")
    if power != "exp" and normalize:  # dW = (dy.v - delta) / den: fold the division into dy and delta
        d_out, delta = d_out / stat[..., None], delta / stat
    log_normalizer = stat * LOG2E if power == "exp" and normalize else jnp.zeros_like(stat)
    interpret = interpret_params(interpret)
    if power == "exp":  # no diagonal-only operands: q and k are not folded
        own = {key: value for key, value in own.items() if not key.endswith("_diag")}
    scratch = scratch_types(ring, own, stages, q.dtype, interpret)
    for out, shape in outputs.items():
        scratch[f"{out}_out_smem"] = (smem_tile((2, BLOCK, *shape), jnp.float32) if shape
                                      else plgpu.SMEM((2, BLOCK), jnp.float32))
    out_type = tuple(jax.ShapeDtypeStruct((bh, padded, *shape), jnp.float32) for shape in outputs.values())
    kernel = functools.partial(body, power=power, num_heads=num_heads, group=group, stages=stages, dk=dk,
                               dv=v.shape[-1], num_blocks=padded // BLOCK)
    main = operands(q, k, g_local, totals, power=power, num_heads=num_heads, group=group)
    return launch(name, kernel, out_type, scratch, bh, padded, interpret)(
        *main[:2], v, *main[2:], d_out.astype(q.dtype), log_normalizer, delta)


def backward_dq(q, k, v, g_local, totals, d_out, stat, delta, *, power, normalize, block, num_heads, group,
                interpret=False, stages=2):
    """dq (of the pre-scaled q) (BH, Np, dk) and the row sums of the log-decay cotangent (BH, Np), float32;
    arguments as ``triton.backward_dq`` (Np a multiple of 128, ``block`` = 64)."""
    del block
    dk, dv, dtype, f32 = q.shape[-1], v.shape[-1], q.dtype, jnp.float32
    ring = {"k": ((BLOCK, dk), dtype), "v": ((BLOCK, dv), dtype), "kd": ((BLOCK,), f32)}
    own = {"q": ((BLOCK, dk), dtype), "dy": ((BLOCK, dv), dtype), "g": ((BLOCK,), f32), "lse": ((BLOCK,), f32),
           "delta": ((BLOCK,), f32), "q_diag": ((BLOCK, dk), dtype), "k_diag": ((BLOCK, dk), dtype)}
    return _backward("twomamba_mosaic_dq", _dq_kernel, ring, own, {"dq": (dk,), "rows": ()}, q, k, v, g_local,
                     totals, d_out, stat, delta, power=power, normalize=normalize, num_heads=num_heads, group=group,
                     interpret=interpret, stages=stages)


def backward_dkv(q, k, v, g_local, totals, d_out, stat, delta, *, power, normalize, block, num_heads, group,
                 interpret=False, stages=2):
    """dk, dv per query head ((BH, Np, dk), (BH, Np, dv)) and the column sums of the log-decay cotangent (BH, Np),
    float32; arguments as ``backward_dq``."""
    del block
    dk, dv, dtype, f32 = q.shape[-1], v.shape[-1], q.dtype, jnp.float32
    ring = {"q": ((BLOCK, dk), dtype), "dy": ((BLOCK, dv), dtype), "g": ((BLOCK,), f32), "lse": ((BLOCK,), f32),
            "delta": ((BLOCK,), f32)}
    own = {"k": ((BLOCK, dk), dtype), "v": ((BLOCK, dv), dtype), "kd": ((BLOCK,), f32),
           "q_diag": ((BLOCK, dk), dtype), "k_diag": ((BLOCK, dk), dtype)}
    return _backward("twomamba_mosaic_dkv", _dkv_kernel, ring, own, {"dk": (dk,), "dv": (dv,), "cols": ()}, q, k, v,
                     g_local, totals, d_out, stat, delta, power=power, normalize=normalize, num_heads=num_heads,
                     group=group, interpret=interpret, stages=stages)


def _load_own(wg, copies):
    """This warpgroup's own tiles: start every copy, then wait for all of them."""
    for src, smem, bar in copies:
        plgpu.copy_gmem_to_smem(src, smem.at[wg], bar.at[wg])
    for _, _, bar in copies:
        plgpu.barrier_wait(bar.at[wg])


def _weights_and_grads(s, dp, log_decay, r, delta, lse, *, power, diagonal, transposed):
    """(W, dS, T) of one tile: W as the value cotangent sees it, dS the score cotangent to multiply by the other
    operand (for off-diagonal power tiles the folded one, scaled at the end), T = dW * W."""
    shape = s.shape
    along = [1] if transposed else [0]  # the query axis of the tile
    delta = lax.broadcast_in_dim(delta, shape, along)
    if power == "exp":
        logits = s + log_decay - lax.broadcast_in_dim(lse, shape, along)
        if diagonal:
            logits = jnp.where(causal_mask(shape, transposed), logits, -jnp.inf)
        w = jnp.exp2(logits)
        d_s = (dp - delta) * w
        return w, d_s, d_s
    if diagonal:
        decay = jnp.exp2(jnp.where(causal_mask(shape, transposed), jnp.minimum(log_decay, 0.0), -jnp.inf))
    else:
        decay = jnp.exp2(r)  # one scalar: the folded operands carry the rest
    d_w = dp - delta
    w = (s if power == 1 else s * s) * decay
    d_s = d_w * decay if power == 1 else d_w * decay * s  # times p (and, off the diagonal, the row scale) later
    return w, d_s, d_w * w


def _dq_kernel(q_ref, k_ref, v_ref, kd_ref, g_ref, t_ref, q_diag_ref, k_diag_ref, dy_ref, lse_ref, delta_ref,
               dq_ref, rows_ref, *, power, num_heads, group, stages, dk, dv, num_blocks, **smem):
    del dv, num_blocks  # the dk/dv pass's
    head, program, wg = lax.axis_index("heads"), lax.axis_index("rows"), lax.axis_index("wg")
    kv = kv_head(head, num_heads, group)
    folded = power != "exp"
    last_tile = 2 * program + 1
    walk = last_tile + 1
    ring = [("k", k_ref, head if folded else kv), ("v", v_ref, kv), ("kd", kd_ref, head)]

    def issue(step, slot):
        cols = pl.ds((last_tile - step) * BLOCK, BLOCK)
        for name, src, index in ring:
            plgpu.copy_gmem_to_smem(src.at[index, cols], smem[f"{name}_smem"].at[slot], smem[f"{name}_bar"].at[slot])

    pl.when(wg == 2)(lambda: stream(walk, stages, smem["consumed_bar"], issue))

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        block = 2 * program + wg
        rows = pl.ds(block * BLOCK, BLOCK)
        own = [(src.at[head, rows], smem[f"{name}_smem"], smem[f"{name}_bar"])
               for name, src in (("q", q_ref), ("dy", dy_ref), ("g", g_ref), ("lse", lse_ref), ("delta", delta_ref))]
        if folded:
            own += [(q_diag_ref.at[head, rows], smem["q_diag_smem"], smem["q_diag_bar"]),
                    (k_diag_ref.at[kv, rows], smem["k_diag_smem"], smem["k_diag_bar"])]
        _load_own(wg, own)
        row = functools.partial(plgpu.load, layout=_WGMMA.reduce(1))
        g_row, lse, delta = row(smem["g_smem"].at[wg]), row(smem["lse_smem"].at[wg]), row(smem["delta_smem"].at[wg])
        staging = smem["staging_smem"].at[wg] if "staging_smem" in smem else None
        tile = (BLOCK, BLOCK)

        def wait_tile(slot):
            for name, _, _ in ring:
                plgpu.barrier_wait(smem[f"{name}_bar"].at[slot])

        def visit(step, carry, diagonal):
            dq, dq_diag, d_rows, r = carry
            slot = lax.rem(step, jnp.int32(stages))
            wait_tile(slot)
            kd_col = plgpu.load(smem["kd_smem"].at[slot], layout=_WGMMA.reduce(0))
            k_tile = smem["k_smem"].at[slot]
            if diagonal and folded:
                s = matmul(smem["q_diag_smem"].at[wg], smem["k_diag_smem"].at[wg].transpose((1, 0)), tile)
            else:
                s = matmul(smem["q_smem"].at[wg], k_tile.transpose((1, 0)), tile)
            dp = matmul(smem["dy_smem"].at[wg], smem["v_smem"].at[slot].transpose((1, 0)), tile)
            _, d_s, through_decay = _weights_and_grads(
                s, dp, rows_plus_cols(g_row, kd_col + r, tile), r, delta, lse, power=power, diagonal=diagonal,
                transposed=False)
            d_s = d_s.astype(k_tile.dtype)
            if diagonal and folded:
                dq_diag = dq_diag + matmul(d_s, smem["k_diag_smem"].at[wg], (BLOCK, dk), staging)
            else:
                dq = dq + matmul(d_s, k_tile, (BLOCK, dk), staging)
            d_rows = d_rows + through_decay.sum(axis=1)
            plgpu.barrier_arrive(smem["consumed_bar"].at[slot])
            return dq, dq_diag, d_rows, r + t_ref[head, last_tile - step]

        zeros = plgpu.layout_cast(jnp.zeros((BLOCK, dk), jnp.float32), _WGMMA)

        @pl.when(wg == 0)  # tile 2p + 1 is past this warpgroup's queries
        def _():
            wait_tile(0)
            plgpu.barrier_arrive(smem["consumed_bar"].at[0])

        diagonal_step = 1 - wg
        carry = (zeros, zeros, plgpu.layout_cast(jnp.zeros((BLOCK,), jnp.float32), _WGMMA.reduce(1)),
                 -t_ref[head, block])
        carry = visit(diagonal_step, carry, diagonal=True)
        dq, dq_diag, d_rows, _ = lax.fori_loop(diagonal_step + 1, walk, functools.partial(visit, diagonal=False),
                                               carry)
        if folded:  # dq = p exp(g_i / p) (dS' k') + the diagonal's dS k
            dq = _unfold(dq, dq_diag, g_row, power)
        _store(wg, [(dq, smem["dq_out_smem"], dq_ref.at[head, rows]),
                    (d_rows, smem["rows_out_smem"], rows_ref.at[head, rows])])


def _dkv_kernel(q_ref, k_ref, v_ref, kd_ref, g_ref, t_ref, q_diag_ref, k_diag_ref, dy_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, cols_ref, *, power, num_heads, group, stages, dk, dv, num_blocks, **smem):
    head, program, wg = lax.axis_index("heads"), lax.axis_index("rows"), lax.axis_index("wg")
    kv = kv_head(head, num_heads, group)
    folded = power != "exp"
    first_tile = 2 * program
    walk = num_blocks - first_tile
    ring = [("q", q_ref), ("dy", dy_ref), ("g", g_ref), ("lse", lse_ref), ("delta", delta_ref)]

    def issue(step, slot):
        rows = pl.ds((first_tile + step) * BLOCK, BLOCK)
        for name, src in ring:
            plgpu.copy_gmem_to_smem(src.at[head, rows], smem[f"{name}_smem"].at[slot], smem[f"{name}_bar"].at[slot])

    pl.when(wg == 2)(lambda: stream(walk, stages, smem["consumed_bar"], issue))

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        block = first_tile + wg  # this warpgroup's key block
        cols = pl.ds(block * BLOCK, BLOCK)
        own = [(k_ref.at[head if folded else kv, cols], smem["k_smem"], smem["k_bar"]),
               (v_ref.at[kv, cols], smem["v_smem"], smem["v_bar"]),
               (kd_ref.at[head, cols], smem["kd_smem"], smem["kd_bar"])]
        if folded:
            own += [(q_diag_ref.at[head, cols], smem["q_diag_smem"], smem["q_diag_bar"]),
                    (k_diag_ref.at[kv, cols], smem["k_diag_smem"], smem["k_diag_bar"])]
        _load_own(wg, own)
        kd_row = plgpu.load(smem["kd_smem"].at[wg], layout=_WGMMA.reduce(1))
        staging = smem["staging_smem"].at[wg] if "staging_smem" in smem else None
        tile = (BLOCK, BLOCK)
        col = functools.partial(plgpu.load, layout=_WGMMA.reduce(0))

        def wait_tile(slot):
            for name, _ in ring:
                plgpu.barrier_wait(smem[f"{name}_bar"].at[slot])

        def visit(step, carry, diagonal):
            dk_acc, dk_diag, dv_acc, d_cols, r = carry
            slot = lax.rem(step, jnp.int32(stages))
            wait_tile(slot)
            q_tile, dy_tile = smem["q_smem"].at[slot], smem["dy_smem"].at[slot]
            g_col, lse, delta = (col(smem[f"{name}_smem"].at[slot]) for name in ("g", "lse", "delta"))
            if diagonal and folded:
                s = matmul(smem["k_diag_smem"].at[wg], smem["q_diag_smem"].at[wg].transpose((1, 0)), tile)
            else:
                s = matmul(smem["k_smem"].at[wg], q_tile.transpose((1, 0)), tile)
            dp = matmul(smem["v_smem"].at[wg], dy_tile.transpose((1, 0)), tile)
            w, d_s, through_decay = _weights_and_grads(
                s, dp, rows_plus_cols(kd_row + r, g_col, tile), r, delta, lse, power=power, diagonal=diagonal,
                transposed=True)
            dv_acc = dv_acc + matmul(w.astype(dy_tile.dtype), dy_tile, (BLOCK, dv), staging)
            d_s = d_s.astype(q_tile.dtype)
            if diagonal and folded:
                dk_diag = dk_diag + matmul(d_s, smem["q_diag_smem"].at[wg], (BLOCK, dk), staging)
            else:
                dk_acc = dk_acc + matmul(d_s, q_tile, (BLOCK, dk), staging)
            d_cols = d_cols + through_decay.sum(axis=1)
            plgpu.barrier_arrive(smem["consumed_bar"].at[slot])
            return dk_acc, dk_diag, dv_acc, d_cols, r + t_ref[head, first_tile + step]

        @pl.when(wg == 1)  # query tile 2p precedes this warpgroup's keys
        def _():
            wait_tile(0)
            plgpu.barrier_arrive(smem["consumed_bar"].at[0])

        zeros_k = plgpu.layout_cast(jnp.zeros((BLOCK, dk), jnp.float32), _WGMMA)
        zeros_v = plgpu.layout_cast(jnp.zeros((BLOCK, dv), jnp.float32), _WGMMA)
        carry = (zeros_k, zeros_k, zeros_v, plgpu.layout_cast(jnp.zeros((BLOCK,), jnp.float32), _WGMMA.reduce(1)),
                 -t_ref[head, block])
        carry = visit(wg, carry, diagonal=True)
        dk_acc, dk_diag, dv_acc, d_cols, _ = lax.fori_loop(wg + 1, walk, functools.partial(visit, diagonal=False),
                                                           carry)
        if folded:  # dk = p exp(kd_j / p) (dS'^T q') + the diagonal's dS^T q
            dk_acc = _unfold(dk_acc, dk_diag, kd_row, power)
        else:  # q_main is q log2(e)
            dk_acc = dk_acc / LOG2E
        _store(wg, [(dk_acc, smem["dk_out_smem"], dk_ref.at[head, cols]),
                    (dv_acc, smem["dv_out_smem"], dv_ref.at[head, cols]),
                    (d_cols, smem["cols_out_smem"], cols_ref.at[head, cols])])


def _unfold(folded, diagonal, log2_decay, power):
    """A gradient from its off-diagonal part, accumulated against the folded operand, and its diagonal part:
    ``p exp(decay / p)`` row by row (``log2_decay`` in base 2, one per row) times the first, plus p times the
    second (the factor p of d(s^p)/ds left out of both)."""
    scale = power * jnp.exp2(log2_decay / power)
    return folded * lax.broadcast_in_dim(scale, folded.shape, [0]) + diagonal * power


def _store(wg, outputs):
    """Registers -> this warpgroup's shared-memory tiles -> global memory (TMA)."""
    for value, smem, _ in outputs:
        smem.at[wg][...] = value
    plgpu.commit_smem()
    for _, smem, dst in outputs:
        plgpu.copy_smem_to_gmem(smem.at[wg], dst)
    plgpu.wait_smem_to_gmem(0)
