"""Flash-style backward kernels for Hopper GPUs in Mosaic GPU: every matmul on wgmma, tiles by TMA into a ring of
shared-memory slots filled by a memory warpgroup, two compute warpgroups of 64 rows each (as the forward in
``mosaic_gpu.py``, whose module docstring gives the decay bookkeeping).

``backward`` runs one kernel for powers 1 and 2 (``_power_kernel``): each compute warpgroup owns 64 keys and walks
64-token query tiles (and 64-token decay blocks) from the diagonal forward, holding dk and dv in registers besides
the two score tiles (the diagonal's dk, one tile, waits in shared memory; with 128-token query tiles and that third
accumulator in registers they spilled, ~1.2 KB a thread, and the work ran 30% slower on the H200). It also
makes dq, as FlashAttention-3 does: dS goes through shared memory into a fifth matmul with the warpgroup's keys,
and the (64, dk) product is added into a float32 dq in global memory by a TMA reduction (dq's sums run in no fixed
order: not bitwise reproducible from run to run); both compute warpgroups add into the same array. The row sums of
T are not summed per tile (a sum over a tile's keys crosses warps, through scratch that the two warpgroups would
share) but come from the gradients (see ``_backward_power``). exp, and powers at head dim 128 (where that kernel's
accumulators do not fit a thread's registers), run two kernels, as FlashAttention-2 (``_backward_two_pass``): a dq
pass laid out as the forward (one program per 128-token decay block, 128-token key tiles walked back from the one
before the diagonal, the diagonal last), which sums T's rows, and a dk/dv pass laid out as the powers' kernel,
which sums its columns. (exp in the one kernel, its row sums through dS^T times a tile of ones, measured
1.41x-1.49x cuDNN's time against the two passes' 1.32x-1.36x.) All read and write token-major (B, N, H, d) tiles;
dq, dk, dv leave in the operands' dtypes.

Per tile, with W the weights, dW their cotangent and T = dW * W the log-decay cotangent (its row sums and column
sums give the per-token cotangent):

- normalized powers divide by the normalizer: dy and delta arrive divided by it (``pallas._normalized_cotangents``),
  so dW = dy'.v - delta' and dv = W^T dy' as for unnormalized ones;
- off-diagonal power tiles use the keys folded in the kernel, k' = scale k exp(kd/p) (once per program), and one
  factor per query, c_i = exp(g_i + r): with s' = k'.q, W = s'^p c and dS = p dW c s'^(p-1), dq = dS^T k' as it
  is and dk = exp(kd_j/p) scale (dS q), the row factor applied once at the end; diagonal tiles use the unscaled
  k (s = scale k.q) with a masked decay, dS carrying the scale, and add into the same dq;
- powers in the two passes keep no folded copy (shared memory): every tile takes the unscaled s = q.k, off the
  diagonal with the decay as the product of a per-query and a per-key factor, both <= 1 (scale^p in one of them),
  W = s^p (factor) and dS = p s^(p-1) (factor) dW, so the diagonal and the other tiles add into one accumulator;
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
from twomamba_jax.kernels.parallel.mosaic_gpu import (BLOCK, KEY_TILE, LOG2E, ROWS_PER_PROGRAM, causal_mask,
                                                      decay_operands, diagonal_decay, fold_rows, head_indices,
                                                      interpret_params, key_ring, launch, matmul, matmul_into,
                                                      ring_copies, rows_plus_cols, scratch_types, smem_tile,
                                                      stream)

_WGMMA = plgpu.Layout.WGMMA
# Head dims up to which the powers' backward is one kernel (dq added by TMA from the dk/dv walk): at 128 its five
# accumulators (dk, dv, the dq product and two score tiles) exceed a thread's registers, and its tiles 227 KB of
# shared memory; the two-pass kernels (as exp's) then run.
FUSED_DQ_MAX_DIM = 64


def backward(q, k, v, g_local, totals, d_out, stat, delta, *, power, normalize, scale, stages=2, interpret=False):
    """Gradients of the flash-style attention on token-major operands: (dq, dk, dv, row sums, column sums).

    q, k, v, g_local, totals as ``mosaic_gpu.forward`` takes them (128-token decay blocks); d_out: (B, Np, H, dv)
    the output's cotangent; stat: (B H, Np) the forward's statistic; delta: (B H, Np) ``dy . y`` (0 when
    unnormalized). For normalized powers d_out and delta arrive divided by the normalizer (dW = dy'.v - delta'),
    stat unused. Returns dq (B, Np, H, dk) in q's dtype, dk, dv (B, Np, Hk, d) in k's and v's dtypes, and the row
    and column sums of the log-decay cotangent (B H, Np) float32.
    """
    if q.shape[1] % ROWS_PER_PROGRAM:
        raise ValueError(f"q: the Mosaic GPU kernels take whole {ROWS_PER_PROGRAM}-row programs; got {q.shape}")
    interpret = interpret_params(interpret)
    if power == "exp":
        log_normalizer = stat * LOG2E if normalize else jnp.zeros_like(stat)
        return _backward_two_pass(q, k, v, g_local, totals, d_out.astype(q.dtype), delta, log_normalizer,
                                  power=power, scale=scale, stages=stages, interpret=interpret)
    d_out = d_out.astype(q.dtype)
    if max(q.shape[-1], v.shape[-1]) > FUSED_DQ_MAX_DIM:
        return _backward_two_pass(q, k, v, g_local, totals, d_out, delta, None, power=power, scale=scale,
                                  stages=stages, interpret=interpret)
    return _backward_power(q, k, v, g_local, totals, d_out, delta, power=power, scale=scale, stages=stages,
                           interpret=interpret)


def _backward_power(q, k, v, g_local, totals, d_out, delta, *, power, scale, stages, interpret):
    """Powers 1 and 2: one kernel (``_power_kernel``) over 128-key programs, 64-token decay blocks.

    The row and column sums of T come from the gradients: T = dW * W = dS * s / p (dS the score cotangent, s the
    score), so sum_j T_ij = q_i . dq_i / p and sum_i T_ij = k_j . dk_j / p, from the same dS as rounded for the
    matmuls, so that they cancel in the log-decay cotangent as they should (row sums in closed form, dy . y -
    delta, did not: 1-2% errors). The kernel finishes dk, dv and the column sums; dq (summed over programs) and
    its row sums are finished here."""
    batch, padded, heads, dk = q.shape
    kv_heads, dv, dtype = k.shape[2], v.shape[-1], q.dtype
    group = heads // kv_heads
    f32 = jnp.float32
    key_decay, g_rows, block_totals = decay_operands(*_halve_blocks(g_local, totals))
    ring = {"q": ((BLOCK, dk), dtype), "dy": ((BLOCK, dv), dtype), "g": ((BLOCK,), f32), "delta": ((BLOCK,), f32)}
    own = {"k": ((BLOCK, dk), dtype), "v": ((BLOCK, dv), dtype), "kd": ((BLOCK,), f32)}
    scratch = scratch_types(ring, own, stages, dtype, interpret, staging_cols=BLOCK)
    # Per query head: with grouped keys the heads of a group are summed after, in float32.
    dk_dtype, dv_dtype = (k.dtype, v.dtype) if group == 1 else (f32, f32)
    scratch.update(k_main_smem=smem_tile((2, BLOCK, dk), dtype), ds_smem=smem_tile((2, BLOCK, BLOCK), dtype),
                   f32_smem=smem_tile((2, BLOCK, dk), f32), dk_diag_smem=smem_tile((2, BLOCK, dk), f32),
                   dv_smem=smem_tile((2, BLOCK, dv), dv_dtype), cols_smem=plgpu.SMEM((2, BLOCK), f32))
    if dk_dtype != f32:  # float32 dk leaves through dk_diag_smem
        scratch.update(dk_smem=smem_tile((2, BLOCK, dk), dk_dtype))
    if interpret:  # the interpreter has no TMA reductions: read, add and write back through this tile
        scratch.update(sum_smem=smem_tile((2, BLOCK, dk), f32), sum_bar=plgpu.Barrier(num_barriers=2))
    per_query_head = lambda d, kind: jax.ShapeDtypeStruct((batch, padded, heads, d), kind)
    out_type = (per_query_head(dk, dk_dtype), per_query_head(dv, dv_dtype),
                jax.ShapeDtypeStruct((batch * heads, padded), f32))
    kernel = functools.partial(_power_kernel, power=power, scale=scale, num_heads=heads, group=group,
                               stages=stages, dk=dk, dv=dv, num_blocks=padded // BLOCK)
    run = launch("twomamba_mosaic_backward", kernel, out_type, scratch, batch * heads, padded, interpret)
    # Both compute warpgroups add into one float32 dq on the GPU (TMA reductions are atomic); the interpreter's
    # read-add-write is not, so there each warpgroup has its own copy, summed after.
    copies = 2 if interpret else 1
    dq = jax.new_ref(jnp.zeros((copies, batch, padded, heads, dk), f32))
    dk_, dv_, d_cols = run(q, k, v, key_decay, g_rows, block_totals, d_out, delta, dq)
    dq = dq[...].sum(0) if interpret else dq[...][0]
    d_rows = heads_first(jnp.sum(q.astype(f32) * dq, axis=-1), padded) / power
    if group > 1:
        dk_ = dk_.reshape(batch, padded, kv_heads, group, dk).sum(3)
        dv_ = dv_.reshape(batch, padded, kv_heads, group, dv).sum(3)
    return dq.astype(dtype), dk_.astype(k.dtype), dv_.astype(v.dtype), d_rows, d_cols


def _power_kernel(q_ref, k_ref, v_ref, kd_ref, g_ref, t_ref, dy_ref, delta_ref, dq_ref, dk_ref, dv_ref, cols_ref, *,
                  power, scale, num_heads, group, stages, dk, dv, num_blocks, **smem):
    """Each compute warpgroup owns 64 keys and walks 64-token query tiles from its diagonal on. Off the diagonal
    its keys carry their rows' scale and decay (k' = scale k exp(kd / p), made once, in ``k_main_smem``) and each
    tile one factor per query (exp(g_i + r)); the diagonal tile takes the unscaled keys and the masked decay.
    Besides dk and dv it multiplies each tile's dS (through shared memory) by its keys, and the (64, dk) product
    is added into ``dq_ref`` (a TMA reduction; into copy ``wg`` where there are two). dk leaves finished: the
    diagonal's tile waits in ``dk_diag_smem`` for the walk's (against k', times k's row factors at the end)."""
    head, batch, query_head, key_head = head_indices(num_heads, group)
    program, wg = lax.axis_index("rows"), lax.axis_index("wg")
    first_tile = 2 * program
    walk = num_blocks - first_tile
    wait_tile = _stream_query_tiles(smem, stages, lambda step: first_tile + step, walk, {"q": q_ref, "dy": dy_ref},
                                    {"g": g_ref, "delta": delta_ref}, batch=batch, head=head, query_head=query_head)

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        block = first_tile + wg  # this warpgroup's key block
        cols = pl.ds(block * BLOCK, BLOCK)
        _load_own(wg, [(k_ref.at[batch, cols, key_head], smem["k_smem"], smem["k_bar"]),
                       (v_ref.at[batch, cols, key_head], smem["v_smem"], smem["v_bar"]),
                       (kd_ref.at[head, cols], smem["kd_smem"], smem["kd_bar"])])
        kd_row = plgpu.load(smem["kd_smem"].at[wg], layout=_WGMMA.reduce(1))
        key_factor = scale * jnp.exp2(kd_row / power)
        k_smem, k_main_smem = smem["k_smem"].at[wg], smem["k_main_smem"].at[wg]
        fold_rows(k_smem, k_main_smem, key_factor)
        staging = smem["staging_smem"].at[wg] if "staging_smem" in smem else None
        ds_smem, f32_smem, dk_diag_smem = (smem[name].at[wg] for name in ("ds_smem", "f32_smem", "dk_diag_smem"))
        total = (smem["sum_smem"].at[wg], smem["sum_bar"].at[wg]) if "sum_smem" in smem else None
        dq_copy = dq_ref.at[wg] if dq_ref.shape[0] == 2 else dq_ref.at[0]
        tile = (BLOCK, BLOCK)
        col = functools.partial(plgpu.load, layout=_WGMMA.reduce(0))
        zeros = lambda d: plgpu.layout_cast(jnp.zeros((BLOCK, d), jnp.float32), _WGMMA)

        def visit(step, carry, diagonal):
            dk_acc, dv_acc, r = carry
            slot = lax.rem(step, jnp.int32(stages))
            wait_tile(slot)
            q_tile, dy_tile = smem["q_smem"].at[slot], smem["dy_smem"].at[slot]
            g_col, delta = col(smem["g_smem"].at[slot]), col(smem["delta_smem"].at[slot])
            keys = k_smem if diagonal else k_main_smem
            s = matmul(keys, q_tile.transpose((1, 0)), tile)
            dp = matmul(smem["v_smem"].at[wg], dy_tile.transpose((1, 0)), tile)
            w, d_s = _power_tile(s, dp, kd_row, r, g_col, delta, power=power, scale=scale, diagonal=diagonal)
            dv_acc = matmul_into(dv_acc, w.astype(dy_tile.dtype), dy_tile, staging)
            d_s = d_s.astype(q_tile.dtype)
            if diagonal:  # its one tile of dk waits in shared memory, not carried through the walk
                dk_diag_smem[...] = matmul_into(zeros(dk), d_s, q_tile, staging)
            else:
                dk_acc = matmul_into(dk_acc, d_s, q_tile, staging)
            ds_smem[...] = d_s
            plgpu.commit_smem()
            dq = matmul(ds_smem.transpose((1, 0)), keys, (BLOCK, dk))  # (queries, dk)
            plgpu.barrier_arrive(smem["consumed_bar"].at[slot])
            rows = pl.ds((first_tile + step) * BLOCK, BLOCK)
            add_to_global(dq, f32_smem, dq_copy.at[batch, rows, query_head], total)
            return dk_acc, dv_acc, r + t_ref[head, first_tile + step]

        @pl.when(wg == 1)  # query tile 2p precedes this warpgroup's keys
        def _():
            wait_tile(0)
            plgpu.barrier_arrive(smem["consumed_bar"].at[0])

        carry = visit(wg, (zeros(dk), zeros(dv), -t_ref[head, block]), diagonal=True)
        dk_acc, dv_acc, _ = lax.fori_loop(wg + 1, walk, functools.partial(visit, diagonal=False), carry)
        dk_acc = dk_acc * lax.broadcast_in_dim(key_factor, dk_acc.shape, [0]) + plgpu.load(dk_diag_smem,
                                                                                            layout=_WGMMA)
        d_cols = jnp.sum(plgpu.load(k_smem, layout=_WGMMA).astype(jnp.float32) * dk_acc, axis=1) / power
        dk_out = smem["dk_smem"].at[wg] if "dk_smem" in smem else dk_diag_smem
        to_global([(dk_acc, dk_out, dk_ref.at[batch, cols, query_head]),
                    (dv_acc, smem["dv_smem"].at[wg], dv_ref.at[batch, cols, query_head]),
                    (d_cols, smem["cols_smem"].at[wg], cols_ref.at[head, cols])])


def _backward_two_pass(q, k, v, g_local, totals, d_out, delta, log_normalizer, *, power, scale, stages,
                       interpret):
    """Two kernels, as FlashAttention-2: a dq pass laid out as the forward (one program per 128-token decay block,
    128-token key tiles walked back from the one before the diagonal, the diagonal last), which sums T's rows, and
    a dk/dv pass (64 keys per warpgroup, 64-token decay blocks and query tiles), which sums its columns. exp at
    every head dim; powers where the fused kernel's registers do not suffice (head dims over
    ``FUSED_DQ_MAX_DIM``): their tiles take the unscaled q.k, off the diagonal with one decay factor per column,
    the rows' factor applied to the sums after those tiles (see ``_tile_grads``), so neither pass keeps a folded
    copy of its own tile (shared memory at d = 128). ``log_normalizer``: exp's (B H, Np) base-2 log-normalizer
    (zeros when unnormalized); None for powers."""
    batch, padded, heads, dk = q.shape
    kv_heads, dv, dtype = k.shape[2], v.shape[-1], q.dtype
    group = heads // kv_heads
    f32 = jnp.float32
    vectors = ("g", "delta") if log_normalizer is None else ("g", "lse", "delta")

    def args(decay_blocks):  # each pass's operands, for its decay blocks
        key_decay, g_rows, block_totals = decay_operands(*decay_blocks)
        per_token = {"g": g_rows, "lse": log_normalizer, "delta": delta}
        return (q, k, v, key_decay, block_totals, d_out, *(per_token[name] for name in vectors))

    options = dict(power=power, scale=scale, vectors=vectors, num_heads=heads, group=group, stages=stages,
                   interpret=interpret)
    per_token = {name: ((BLOCK,), f32) for name in vectors}
    dq, d_rows = _launch(
        "twomamba_mosaic_dq", _dq_kernel, args((g_local, totals)),
        {"dq": ((batch, padded, heads, dk), dtype), "rows": ((batch * heads, padded), f32)},
        ring={"k": ((KEY_TILE, dk), dtype), "v": ((KEY_TILE, dv), dtype), "kd": ((KEY_TILE,), f32)},
        own={"q": ((BLOCK, dk), dtype), "dy": ((BLOCK, dv), dtype), **per_token}, staging_cols=KEY_TILE,
        in_own_tiles=("dq",), **options)
    # Per query head: the key heads of a group are summed after, in float32.
    dk_dtype, dv_dtype = (k.dtype, v.dtype) if group == 1 else (f32, f32)
    dk_, dv_, d_cols = _launch(
        "twomamba_mosaic_dkv", _dkv_kernel, args(_halve_blocks(g_local, totals)),
        {"dk": ((batch, padded, heads, dk), dk_dtype), "dv": ((batch, padded, heads, dv), dv_dtype),
         "cols": ((batch * heads, padded), f32)},
        ring={"q": ((BLOCK, dk), dtype), "dy": ((BLOCK, dv), dtype), **per_token},
        own={"k": ((BLOCK, dk), dtype), "v": ((BLOCK, dv), dtype), "kd": ((BLOCK,), f32)}, staging_cols=BLOCK,
        **options)
    if group > 1:
        dk_ = dk_.reshape(batch, padded, kv_heads, group, dk).sum(3).astype(k.dtype)
        dv_ = dv_.reshape(batch, padded, kv_heads, group, dv).sum(3).astype(v.dtype)
    return dq, dk_, dv_, d_rows, d_cols


def _halve_blocks(g_local, totals):
    """(g_local, totals) of 128-token decay blocks -> the same of 64-token ones."""
    g = g_local.reshape(totals.shape[0], -1, 2, BLOCK)
    first = g[:, :, 0, -1]
    g = jnp.stack([g[:, :, 0], g[:, :, 1] - first[..., None]], axis=2)
    return g.reshape(g_local.shape), jnp.stack([first, totals - first], axis=-1).reshape(totals.shape[0], -1)


def _launch(name, body, args, outputs, *, ring, own, interpret, stages, staging_cols, in_own_tiles=(),
            **options):
    """``body`` over (B H, 128-row program) with ``ring`` (name -> per-step tile) streamed by the memory
    warpgroup, ``own`` tiles per compute warpgroup and ``outputs`` (name -> (shape, dtype)). Each output leaves
    through a shared-memory tile: one of the kernel's own tiles for those ``in_own_tiles`` names (free once the
    walk is done), else one allocated per (columns, dtype), ``_out_tile(smem, columns, dtype)``, which outputs of
    the same kind share one after the other (shared memory: at head dim 128 two float32 tiles would not fit)."""
    scratch = scratch_types(ring, own, stages, args[0].dtype, interpret, staging_cols=staging_cols)
    for out, (shape, dtype) in outputs.items():
        if out not in in_own_tiles:
            scratch[_out_tile_name(shape[-1] if len(shape) == 4 else None, dtype)] = (
                smem_tile((2, BLOCK, shape[-1]), dtype) if len(shape) == 4 else plgpu.SMEM((2, BLOCK), dtype))
    out_type = tuple(jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in outputs.values())
    kernel = functools.partial(body, stages=stages, **options)
    bh, padded = args[3].shape
    return launch(name, kernel, out_type, scratch, bh, padded, interpret)(*args)


def _out_tile_name(columns, dtype):
    return f"out_{columns or 'vector'}_{jnp.dtype(dtype).name}_smem"


def _out_tile(smem, columns, dtype):
    """A kernel's output staging tile of ``columns`` (None for per-token vectors) and ``dtype`` (see ``_launch``)."""
    return smem[_out_tile_name(columns, dtype)]


def _stream_query_tiles(smem, stages, tile_of_step, walk, tiles, vectors, *, batch, head, query_head):
    """Starts the memory warpgroup on ``walk`` 64-token query tiles, ``tile_of_step(step)`` at each step (the passes
    over query tiles): ``tiles`` (name -> (B, Np, H, d) ref, read at the query head) and ``vectors`` (name -> (B H,
    Np) ref) each into its ring ``NAME_smem``. Returns ``wait_tile(slot)``."""
    ring = [(name, lambda rows, src=src: src.at[batch, rows, query_head]) for name, src in tiles.items()]
    ring += [(name, lambda rows, src=src: src.at[head, rows]) for name, src in vectors.items()]
    issue, wait_tile = ring_copies(ring, smem, tile_of_step, BLOCK)
    pl.when(lax.axis_index("wg") == 2)(lambda: stream(walk, stages, smem["consumed_bar"], issue))
    return wait_tile


def _load_own(wg, copies):
    """This warpgroup's own tiles: start every copy, then wait for all of them."""
    for src, smem, bar in copies:
        plgpu.copy_gmem_to_smem(src, smem.at[wg], bar.at[wg])
    for _, _, bar in copies:
        plgpu.barrier_wait(bar.at[wg])


def _power_tile(s, dp, kd_row, r, g_col, delta, *, power, scale, diagonal):
    """(W, dS) of one (keys, queries) tile of the powers' backward: W as the value cotangent sees it, dS the
    cotangent of the tile's matmul (k'.q off the diagonal, k.q on it), every factor of its products with q and k
    in it. ``kd_row`` per key, ``g_col`` and ``delta`` per query, ``r`` the decay of the blocks between."""
    shape = s.shape
    d_w = dp - lax.broadcast_in_dim(delta, shape, [1])
    if diagonal:  # g_i - g_j, masked: exp(g_i) exp(-g_j) could overflow
        decay = diagonal_decay(rows_plus_cols(kd_row + r, g_col, shape), causal_mask(shape, transposed=True))
        s = s * scale
        grad_factor = decay * (power * scale)
    else:  # one factor per query (<= 1); the keys' are in k'
        query_decay = jnp.exp2(g_col + r)
        decay = lax.broadcast_in_dim(query_decay, shape, [1])
        grad_factor = lax.broadcast_in_dim(query_decay * power, shape, [1])
    w = (s if power == 1 else s * s) * decay
    return w, (d_w * grad_factor if power == 1 else d_w * grad_factor * s)


def _tile_grads(s, dp, own_decay, other_decay, r, delta, lse, *, power, scale, diagonal, transposed, row_offset):
    """(W, dS, T) of one tile of the two-pass backward from its unscaled q.k (or k.q when ``transposed``: rows are
    keys) ``s`` and dy.v ``dp``: W the weights, dS the matmul operand of dq and dk (times ``_grad_scale`` after),
    T = dW * W the log-decay cotangent. The tile's base-2 log-decay is ``own_decay[i] + other_decay[j] + r``: the
    rows' part (the same for every tile of the walk), the columns' and the blocks' between (all <= 0 off the
    diagonal); on the diagonal it is masked (``row_offset``: the first row's index in the diagonal block). Off the
    diagonal the powers leave out the rows' factor ``_row_factor`` (no per-element exponential: one factor per
    column), which the kernels apply to their accumulators after those tiles. ``delta``, ``lse`` (exp only) per
    query."""
    shape = s.shape
    along = [1] if transposed else [0]  # the query axis of the tile
    d_w = dp - lax.broadcast_in_dim(delta, shape, along)
    mask = causal_mask(shape, transposed, row_offset) if diagonal else None
    if power == "exp":
        logits = s * (scale * LOG2E) + rows_plus_cols(own_decay, other_decay + r, shape) - lax.broadcast_in_dim(
            lse, shape, along)
        if diagonal:
            logits = jnp.where(mask, logits, -jnp.inf)
        w = jnp.exp2(logits)
        t = d_w * w
        return w, t, t
    if diagonal:
        factor = diagonal_decay(rows_plus_cols(own_decay, other_decay + r, shape), mask) * scale**power
    else:
        factor = lax.broadcast_in_dim(jnp.exp2(other_decay + r), shape, [1])
    if power == 1:
        w, d_s = s * factor, d_w * factor
    else:
        s_factor = s * factor
        w, d_s = s * s_factor, d_w * s_factor * 2.0
    return w, d_s, d_w * w


def _row_factor(own_decay, power, scale):
    """What the powers' off-diagonal tiles of ``_tile_grads`` leave out, per row (<= 1): applied once to the sums
    over those tiles, which are linear in it."""
    return scale**power * jnp.exp2(own_decay)


def _times_rows(factor, *accumulators):
    """Each (rows, ...) accumulator times ``factor`` (rows,) along its first axis."""
    return tuple(x * (factor if x.ndim == 1 else lax.broadcast_in_dim(factor, x.shape, [0])) for x in accumulators)


def _grad_scale(power, scale):
    """What dq and dk are multiplied by after the walk: exp's dS is d(logits), the logits being scale q.k."""
    return scale if power == "exp" else 1.0


def _dq_kernel(q_ref, k_ref, v_ref, kd_ref, t_ref, dy_ref, *refs, power, scale, vectors, num_heads, group,
               stages, **smem):
    head, batch, query_head, key_head = head_indices(num_heads, group)
    program, wg = lax.axis_index("rows"), lax.axis_index("wg")
    vector_refs, (dq_ref, rows_ref) = dict(zip(vectors, refs)), refs[len(vectors):]
    # Key tiles p - 1, ..., 0, then the diagonal p.
    tile_of_step = lambda step: jnp.where(step < program, program - 1 - step, program)
    issue, wait_tile = ring_copies(key_ring(k_ref, v_ref, kd_ref, head, batch, key_head), smem, tile_of_step)

    pl.when(wg == 2)(lambda: stream(program + 1, stages, smem["consumed_bar"], issue))

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        rows = pl.ds(program * KEY_TILE + wg * BLOCK, BLOCK)
        own = [("q", q_ref.at[batch, rows, query_head]), ("dy", dy_ref.at[batch, rows, query_head])]
        own += [(name, vector_refs[name].at[head, rows]) for name in vectors]
        _load_own(wg, [(src, smem[f"{name}_smem"], smem[f"{name}_bar"]) for name, src in own])
        row = {name: plgpu.load(smem[f"{name}_smem"].at[wg], layout=_WGMMA.reduce(1)) for name in vectors}
        staging = smem["staging_smem"].at[wg] if "staging_smem" in smem else None
        q_tile = smem["q_smem"].at[wg]
        tile = (BLOCK, KEY_TILE)

        def visit(step, carry, diagonal):
            dq, d_rows, r = carry
            slot = lax.rem(step, jnp.int32(stages))
            wait_tile(slot)
            kd_col = plgpu.load(smem["kd_smem"].at[slot], layout=_WGMMA.reduce(0))
            k_tile = smem["k_smem"].at[slot]
            s = matmul(q_tile, k_tile.transpose((1, 0)), tile)
            dp = matmul(smem["dy_smem"].at[wg], smem["v_smem"].at[slot].transpose((1, 0)), tile)
            _, d_s, t = _tile_grads(s, dp, row["g"], kd_col, r, row["delta"], row.get("lse"), power=power,
                                    scale=scale, diagonal=diagonal, transposed=False, row_offset=wg * BLOCK)
            dq = matmul_into(dq, d_s.astype(k_tile.dtype), k_tile, staging)
            d_rows = d_rows + t.sum(axis=1)
            plgpu.barrier_arrive(smem["consumed_bar"].at[slot])
            return dq, d_rows, r + t_ref[head, tile_of_step(step)]

        carry = (plgpu.layout_cast(jnp.zeros((BLOCK, q_tile.shape[-1]), jnp.float32), _WGMMA),
                 plgpu.layout_cast(jnp.zeros((BLOCK,), jnp.float32), _WGMMA.reduce(1)), jnp.float32(0))
        dq, d_rows, _ = lax.fori_loop(jnp.int32(0), program, functools.partial(visit, diagonal=False), carry)
        if power != "exp":
            dq, d_rows = _times_rows(_row_factor(row["g"], power, scale), dq, d_rows)
        dq, d_rows, _ = visit(program, (dq, d_rows, -t_ref[head, program]), diagonal=True)
        to_global([(dq * _grad_scale(power, scale), q_tile, dq_ref.at[batch, rows, query_head]),
                    (d_rows, _out_tile(smem, None, jnp.float32).at[wg], rows_ref.at[head, rows])])


def _dkv_kernel(q_ref, k_ref, v_ref, kd_ref, t_ref, dy_ref, *refs, power, scale, vectors, num_heads, group, stages,
                **smem):
    """Each compute warpgroup owns 64 keys (block 2p + wg) and walks the 64-token query tiles from its diagonal on.
    exp visits the diagonal first: the memory warpgroup streams tiles 2p, 2p + 1, ..., the last (the second
    warpgroup only releases tile 2p). The powers visit it last, since their off-diagonal sums take the rows' factor
    before it: the stream is 2p + 2, ..., the last, then 2p + 1 (the first warpgroup's last tile off the diagonal,
    the second's diagonal) and 2p (the first's diagonal; the second only releases it). exp has no rows' factor to
    take, and keeps the order it was measured in."""
    head, batch, query_head, key_head = head_indices(num_heads, group)
    program, wg = lax.axis_index("rows"), lax.axis_index("wg")
    vector_refs, (dk_ref, dv_ref, cols_ref) = dict(zip(vectors, refs)), refs[len(vectors):]
    first_tile = 2 * program
    walk = dk_ref.shape[1] // BLOCK - first_tile
    diagonal_last = power != "exp"
    if diagonal_last:
        tile_of_step = lambda step: jnp.where(step < walk - 2, first_tile + 2 + step, first_tile + walk - 1 - step)
        diagonal_step, released_step = walk - 1 - wg, walk - 1
    else:
        tile_of_step = lambda step: first_tile + step
        diagonal_step, released_step = wg, 0
    wait_tile = _stream_query_tiles(smem, stages, tile_of_step, walk, {"q": q_ref, "dy": dy_ref}, vector_refs,
                                    batch=batch, head=head, query_head=query_head)

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        block = first_tile + wg  # this warpgroup's key block
        cols = pl.ds(block * BLOCK, BLOCK)
        _load_own(wg, [(k_ref.at[batch, cols, key_head], smem["k_smem"], smem["k_bar"]),
                       (v_ref.at[batch, cols, key_head], smem["v_smem"], smem["v_bar"]),
                       (kd_ref.at[head, cols], smem["kd_smem"], smem["kd_bar"])])
        kd_row = plgpu.load(smem["kd_smem"].at[wg], layout=_WGMMA.reduce(1))
        staging = smem["staging_smem"].at[wg] if "staging_smem" in smem else None
        k_tile, v_tile = smem["k_smem"].at[wg], smem["v_smem"].at[wg]
        tile = (BLOCK, BLOCK)

        def visit(step, carry, diagonal):
            dk_acc, dv_acc, d_cols, r = carry
            slot = lax.rem(step, jnp.int32(stages))
            wait_tile(slot)
            q_tile, dy_tile = smem["q_smem"].at[slot], smem["dy_smem"].at[slot]
            col = {name: plgpu.load(smem[f"{name}_smem"].at[slot], layout=_WGMMA.reduce(0)) for name in vectors}
            s = matmul(k_tile, q_tile.transpose((1, 0)), tile)
            dp = matmul(v_tile, dy_tile.transpose((1, 0)), tile)
            # r: the decay of the blocks between (a running sum); with the diagonal last, the tile right after the
            # keys' block comes after the others, and has none.
            query_tile = tile_of_step(step)
            if diagonal_last and not diagonal:
                r = jnp.where(query_tile == block + 1, 0.0, r)
            w, d_s, t = _tile_grads(s, dp, kd_row, col["g"], r, col["delta"], col.get("lse"), power=power,
                                    scale=scale, diagonal=diagonal, transposed=True, row_offset=0)
            dv_acc = matmul_into(dv_acc, w.astype(dy_tile.dtype), dy_tile, staging)
            dk_acc = matmul_into(dk_acc, d_s.astype(q_tile.dtype), q_tile, staging)
            d_cols = d_cols + t.sum(axis=1)
            plgpu.barrier_arrive(smem["consumed_bar"].at[slot])
            return dk_acc, dv_acc, d_cols, r + t_ref[head, query_tile]

        def release():  # query tile 2p precedes the second warpgroup's keys: it only releases its slot, in turn
            slot = lax.rem(jnp.int32(released_step), jnp.int32(stages))
            wait_tile(slot)
            plgpu.barrier_arrive(smem["consumed_bar"].at[slot])

        zeros = [plgpu.layout_cast(jnp.zeros((BLOCK, k_tile.shape[-1]), jnp.float32), _WGMMA),
                 plgpu.layout_cast(jnp.zeros((BLOCK, v_tile.shape[-1]), jnp.float32), _WGMMA),
                 plgpu.layout_cast(jnp.zeros((BLOCK,), jnp.float32), _WGMMA.reduce(1))]
        off_diagonal = functools.partial(visit, diagonal=False)
        if diagonal_last:
            carry = (*zeros, jnp.where(wg == 0, t_ref[head, first_tile + 1], 0.0))  # r of tile 2p + 2
            dk_acc, dv_acc, d_cols, _ = lax.fori_loop(0, diagonal_step, off_diagonal, carry)
            dk_acc, dv_acc, d_cols = _times_rows(_row_factor(kd_row, power, scale), dk_acc, dv_acc, d_cols)
            dk_acc, dv_acc, d_cols, _ = visit(diagonal_step, (dk_acc, dv_acc, d_cols, -t_ref[head, block]),
                                              diagonal=True)
            pl.when(wg == 1)(release)
        else:
            pl.when(wg == 1)(release)
            carry = visit(diagonal_step, (*zeros, -t_ref[head, block]), diagonal=True)
            dk_acc, dv_acc, d_cols, _ = lax.fori_loop(diagonal_step + 1, walk, off_diagonal, carry)

        staged = lambda x, ref: _out_tile(smem, x.shape[-1] if x.ndim == 2 else None, ref.dtype).at[wg]
        to_global([(dk_acc * _grad_scale(power, scale), staged(dk_acc, dk_ref), dk_ref.at[batch, cols, query_head]),
                    (dv_acc, staged(dv_acc, dv_ref), dv_ref.at[batch, cols, query_head]),
                    (d_cols, staged(d_cols, cols_ref), cols_ref.at[head, cols])])


def to_global(outputs, wait=True):
    """Each ``(value, smem, dst)`` in turn: ``value`` -> ``smem`` (once the copies before have read it: outputs
    may share a tile) -> global ``dst``; then, if ``wait``, waits for the copies to land. Writes inside a loop
    pass ``wait=False`` (a round trip to global memory each time otherwise): the next write through the tile waits
    only until the copy has read it, and the warpgroup's last full wait covers them all."""
    for value, smem, dst in outputs:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        smem[...] = value.astype(smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(smem, dst)
    if wait:
        plgpu.wait_smem_to_gmem(0)


def add_to_global(value, smem, dst, total):
    """``dst += value`` through the tile ``smem``: a TMA reduction on the GPU; the interpreter has none, so there
    (``total`` = (a tile like ``smem``, a barrier)) ``dst`` is read, added to and written back (the warpgroup is
    the only writer of ``dst`` while its program runs, and the interpreter runs programs one at a time)."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    if total is not None:
        tile, bar = total
        plgpu.copy_gmem_to_smem(dst, tile, bar)
        plgpu.barrier_wait(bar)
        value = value + tile[...]
    smem[...] = value.astype(smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem, dst, reduction_op=None if total is not None else "add")
    if total is not None:
        plgpu.wait_smem_to_gmem(0)
