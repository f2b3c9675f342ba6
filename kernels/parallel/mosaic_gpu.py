"""Flash-style forward kernel for Hopper GPUs in Mosaic GPU (``plgpu.kernel``): warpgroup matmuls (wgmma) with
float32 accumulators, TMA copies into shared memory and warp specialization, FlashAttention-3 style.

Operands stay token-major, (B, N, H, d) as the model holds them: TMA copies a (tokens, d) tile of one head
straight out of them, so no (B, N, H, d) array is transposed before or after the kernels (only per-token vectors
are). One program per (batch x query head, 128 query rows = one decay block): two compute warpgroups own 64 rows
each, a third warpgroup only issues TMA copies of the 128-token key / value tiles into a ring of ``stages``
shared-memory slots. Both compute warpgroups walk the key tiles from the diagonal back to the first, so the
log-decay between the query rows and a key tile is a short running sum of block totals, never the difference of
two long cumulative sums. (128-token key tiles: the (64, 128) score tile keeps wgmma busy twice as long per
barrier round as a (64, 64) one; 64-token tiles measured 16% slower at 8k tokens in jax's own attention_mgpu.)

Decay without a per-element exponential (powers 1 and 2). With g the block-local inclusive cumulative log-decay,
T_J a block's total and ``kd_j = T_J - g_j`` (the decay from key j to its block's end), query i of block I and key
j of an earlier block J have ``g_i - g_j = g_i + kd_j + r_IJ`` with ``r_IJ`` = the totals of the blocks between
(<= 0). So off the diagonal the weight ``(scale q_i.k_j)^p exp(g_i - g_j)`` is ``(q'_i.k_j)^p exp(kd_j + r_IJ)``
with ``q' = scale q exp(g / p)``, folded by each compute warpgroup into a copy of its own query tile once per
program, and one factor per key a tile (both factors <= 1: a product of two that underflows is one whose true
value underflows too). The diagonal tile uses the unscaled q (the kernel multiplies q.k by ``scale``) with a
masked ``exp2(min(g_i - g_j, 0))``: there ``exp(g_i) exp(-g_j)`` could overflow. Keys and values are read as they
come, one key head for the query heads of its group.

exp (2Mamba-E): the decay is added to the logits, ``scale log2(e) q.k + g_i + (kd_j + r_IJ)``, all in base 2 (g,
kd and the totals arrive pre-multiplied by log2(e)), with FA3-style online rescaling when normalized; q and k go
in as they are.

Outputs: y (B, Np, H, dv) and the per-token statistic (B H, Np) (the normalizer, or the natural-log normalizer for
normalized exp), which the backward kernels (``mosaic_gpu_backward.py``) take. The helpers below
(``decay_operands``, ``fold_rows``, ``ring_copies``, ``stream``, ``matmul``, ``matmul_into``, ``launch``) serve the
backward kernels too.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from twomamba_jax.ops.numerics import NORMALIZER_EPS

BLOCK = 64  # rows of one compute warpgroup (wgmma M = 64), and tokens of the backward's tiles and decay blocks
ROWS_PER_PROGRAM = 2 * BLOCK  # two compute warpgroups
KEY_TILE = ROWS_PER_PROGRAM  # the forward's key tiles and decay blocks: 128 tokens, one program's query rows
LOG2E = math.log2(math.e)


def smem_tile(shape, dtype):
    """A shared-memory tile in 128-byte swizzled rows (64 bf16 or 32 float32 columns a tile): the layout wgmma
    and TMA read without bank conflicts."""
    columns = 128 // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, columns)), plgpu.SwizzleTransform(128)))


def forward(q, k, v, g_local, totals, *, power, normalize, scale, low_part=False, stages=2, interpret=False):
    """The flash-style forward on Hopper, on token-major operands (as the model holds them: no transposes).

    q: (B, Np, H, dk); k: (B, Np, Hk, dk) and v: (B, Np, Hk, dv) with Hk dividing H (query head h reads key head
    h // (H / Hk)); g_local: (B H, Np) float32 cumulative log-decays local to each 128-token block; totals:
    (B H, Np / 128) each block's log-decay. Np a multiple of 128, dk and dv multiples of 64, q/k/v bfloat16 (or
    float16); ``scale`` multiplies q.k. ``interpret``: True (or ``plgpu.InterpretGPUParams``) runs the kernel in
    the Mosaic GPU interpreter. Returns y (B, Np, H, dv) in v's dtype and the statistic (B H, Np) float32 (see the
    module docstring); with ``low_part`` (powers) also what y's rounding left out, y_low = y_f32 - y in v's
    dtype, after y: y + y_low carries ~16 bits of y's float32 value, for the backward (shared memory at head dim
    128 has no room for a float32 y tile; y_low leaves through the folded queries' tile), and the diagonal
    tile's weights enter the normalizer rounded as its matmul reads them.
    """
    batch, padded, heads, dk = q.shape
    if padded % ROWS_PER_PROGRAM:
        raise ValueError(f"q: the Mosaic GPU kernel takes whole {ROWS_PER_PROGRAM}-row programs; got {q.shape}")
    interpret = interpret_params(interpret)
    dv = v.shape[-1]
    dtype = q.dtype
    if g_local.shape[-1] != KEY_TILE * totals.shape[-1]:
        raise ValueError(f"totals: expected one per {KEY_TILE}-token block of g_local {g_local.shape}; got "
                         f"{totals.shape}")
    key_decay, g_rows, totals = decay_operands(g_local, totals)
    kernel = functools.partial(_kernel, power=power, normalize=normalize, scale=scale, num_heads=heads,
                               group=heads // k.shape[2], stages=stages, dtype=dtype, dv=dv)
    own = {"q": ((BLOCK, dk), dtype), "g": ((BLOCK,), jnp.float32)}
    ring = {"k": ((KEY_TILE, dk), dtype), "v": ((KEY_TILE, dv), dtype), "kd": ((KEY_TILE,), jnp.float32)}
    scratch = scratch_types(ring, own, stages, dtype, interpret, staging_cols=KEY_TILE)
    scratch.update(stat_smem=plgpu.SMEM((2, BLOCK), jnp.float32))
    if (dv, v.dtype) != (dk, dtype):  # else y (and y_low) leave through the query tiles (shared memory at 128)
        scratch.update(y_smem=smem_tile((2, BLOCK, dv), v.dtype))
        if low_part:
            scratch.update(y_low_smem=smem_tile((2, BLOCK, dv), v.dtype))
    if power != "exp":  # the folded queries, made by the kernel
        scratch.update(q_main_smem=smem_tile((2, BLOCK, dk), dtype))
    elif low_part:
        raise ValueError("low_part: for powers (exp's backward needs no more of y than its dtype)")
    y_type = jax.ShapeDtypeStruct((batch, padded, heads, dv), v.dtype)
    out_type = (y_type, *([y_type] if low_part else []), jax.ShapeDtypeStruct((batch * heads, padded), jnp.float32))
    return launch("twomamba_mosaic_forward", kernel, out_type, scratch, batch * heads, padded, interpret)(
        q, k, v, key_decay, g_rows, totals)


def launch(name, kernel, out_type, scratch, bh, padded, interpret):
    """A kernel over (batch x query head, 128-row program), two compute warpgroups and one memory warpgroup."""
    return plgpu.kernel(
        kernel, out_type=out_type, scratch_types=scratch, grid=(bh, padded // ROWS_PER_PROGRAM),
        grid_names=("heads", "rows"), num_threads=3, thread_name="wg", kernel_name=name,
        compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret)


def interpret_params(interpret):
    """``interpret`` as ``plgpu.kernel`` takes it: True means the Mosaic GPU interpreter's default parameters."""
    return plgpu.InterpretGPUParams() if interpret is True else (interpret or None)


def scratch_types(ring, own, stages, dtype, interpret, staging_cols=BLOCK):
    """Shared memory and barriers of a kernel: ``ring`` (name -> (shape, dtype)) gets ``stages`` slots filled by
    the memory warpgroup, ``own`` one buffer per compute warpgroup, each as ``NAME_smem`` with a barrier
    ``NAME_bar``; plus the slots' ``consumed_bar`` and, in the interpreter, the ``staging_smem`` tiles that register
    operands of wgmma go through (see ``matmul_into``), (64, ``staging_cols``) each."""
    scratch = {"consumed_bar": plgpu.Barrier(num_arrivals=2, num_barriers=stages)}
    for shapes, count in ((ring, stages), (own, 2)):
        for name, (shape, kind) in shapes.items():
            scratch[f"{name}_smem"] = (smem_tile((count, *shape), kind) if len(shape) == 2
                                       else plgpu.SMEM((count, *shape), kind))
            scratch[f"{name}_bar"] = plgpu.Barrier(num_barriers=count)
    if interpret:
        scratch["staging_smem"] = smem_tile((2, BLOCK, staging_cols), dtype)
    return scratch


def decay_operands(g_local, totals):
    """(key_decay, g, totals) in base 2 (times log2(e)), heads first: kd = the decay from each key to the end of
    its block (<= 0), g the block-local cumulative log-decays, totals each block's. The decay blocks are as long
    as g_local says: (B H, Np) over (B H, Np / block)."""
    block = g_local.shape[-1] // totals.shape[-1]
    key_decay = jnp.repeat(totals, block, axis=-1) - g_local
    return key_decay * LOG2E, g_local * LOG2E, totals * LOG2E


def fold_rows(src, dst, factor):
    """``dst = src * factor`` row by row, ``src``, ``dst`` (64, d) shared-memory tiles, ``factor`` (64,) in the
    wgmma row layout: a warpgroup's own operand with its rows' scale and decay folded in, once per program."""
    x = plgpu.load(src, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
    dst[...] = (x * lax.broadcast_in_dim(factor, x.shape, [0])).astype(dst.dtype)
    plgpu.commit_smem()


def longest_first(num_programs):
    """This program's 128-row block when the blocks with the longest causal walks (the last ones) run first: the
    GPU starts programs in grid order, and with the longest last a final wave of them keeps a few SMs busy while
    the rest idle (by list scheduling, 9% / 6% / 3% over the ideal at 2k / 4k / 8k tokens with 64 heads on 132
    SMs; under 2% longest first)."""
    return num_programs - 1 - lax.axis_index("rows")


def head_indices(num_heads, group):
    """(the program's head of B H, its batch, its query head, its key head) in a kernel over ("heads", ...)."""
    head = lax.axis_index("heads")
    query_head = lax.rem(head, jnp.int32(num_heads))
    return head, lax.div(head, jnp.int32(num_heads)), query_head, lax.div(query_head, jnp.int32(group))


def stream(walk, stages, consumed_bar, issue, prologue=None):
    """The memory warpgroup: for each step of the walk, once its ring slot is free, ``issue(step, slot)`` starts
    the step's TMA copies; then it waits for the last slots to be consumed (so that every phase of every barrier
    is observed, as the interpreter checks). ``prologue()`` runs first, once the warpgroup has handed its
    registers to the compute warpgroups (which wait for them)."""
    plgpu.set_max_registers(40, action="decrease")
    if prologue is not None:
        prologue()

    @pl.loop(0, walk)
    def _(step):
        slot = lax.rem(step, jnp.int32(stages))

        @pl.when(step >= stages)
        def _():
            plgpu.barrier_wait(consumed_bar.at[slot])

        issue(step, slot)

    @pl.loop(jnp.maximum(walk - stages, 0), walk)
    def _(step):
        plgpu.barrier_wait(consumed_bar.at[lax.rem(step, jnp.int32(stages))])


def ring_copies(ring, smem, tile_of_step, size=KEY_TILE):
    """(issue, wait_tile) of a streamed ring of ``size``-token tiles: ``issue(step, slot)`` starts the TMA copy of
    every ``(name, src)`` of ``ring`` (``src(tokens)`` the global slice of tile ``tile_of_step(step)``) into
    ``NAME_smem`` slot ``slot``, signalling ``NAME_bar``; ``wait_tile(slot)`` waits for all of them."""
    def issue(step, slot):
        tokens = pl.ds(tile_of_step(step) * size, size)
        for name, src in ring:
            plgpu.copy_gmem_to_smem(src(tokens), smem[f"{name}_smem"].at[slot], smem[f"{name}_bar"].at[slot])

    def wait_tile(slot):
        for name, _ in ring:
            plgpu.barrier_wait(smem[f"{name}_bar"].at[slot])
    return issue, wait_tile


def key_ring(k_ref, v_ref, kd_ref, head, batch, key_head):
    """The ``ring_copies`` entries of a walk over key tiles (the forward, exp's dq pass): keys and values of the
    key head, the query head's key decays."""
    return [("k", lambda cols: k_ref.at[batch, cols, key_head]), ("v", lambda cols: v_ref.at[batch, cols, key_head]),
            ("kd", lambda cols: kd_ref.at[head, cols])]


def matmul(a, b, shape):
    """wgmma ``a @ b`` into a fresh float32 accumulator of ``shape``; ``a``, ``b`` shared-memory refs."""
    def run(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]
    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def matmul_into(acc, a, b, staging=None):
    """``acc + a @ b`` by wgmma, ``a`` a register array (the tile's weights) and ``b`` a shared-memory ref.

    On the GPU the product accumulates in place (``pl.run_state`` on ``acc``'s registers: no second accumulator
    alive). ``staging`` is given in the interpreter only, whose wgmma reads shared memory and which has no
    run_state: ``a`` goes through that tile and the product is added to ``acc`` (the same numbers)."""
    if staging is not None:
        staging[...] = a
        plgpu.commit_smem()
        return acc + matmul(staging, b, acc.shape)
    return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b))(plgpu.ACC.init(acc))


def matmul_add(acc, a, b, interpret):
    """``acc + a @ b`` by wgmma, ``a`` and ``b`` shared-memory refs: in place on the GPU (as ``matmul_into``); the
    interpreter, which has no run_state, adds a fresh product."""
    if interpret:
        return acc + matmul(a, b, acc.shape)
    return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b))(plgpu.ACC.init(acc))


def matmuls(accs, products, interpret, staging=None):
    """``accs`` after ``accs[i] += a @ b`` for every ``(i, a, b)`` of ``products`` (``a`` a register array or a
    shared-memory ref, ``b`` a shared-memory ref). On the GPU they are issued together and waited for once; the
    interpreter runs them one after another, a register ``a`` through ``staging``."""
    if interpret:
        accs = list(accs)
        for i, a, b in products:
            in_registers = isinstance(a, jax.Array)  # refs are not arrays
            accs[i] = matmul_into(accs[i], a, b, staging) if in_registers else accs[i] + matmul(a, b, accs[i].shape)
        return accs

    def issue(acc_refs):
        for i, a, b in products:
            plgpu.wgmma(acc_refs[i], a, b)

    return list(pl.run_state(issue)(tuple(plgpu.ACC.init(acc) for acc in accs)))


def _kernel(q_ref, k_ref, v_ref, kd_ref, g_ref, t_ref, y_ref, *refs, q_smem, k_smem, v_smem, kd_smem,
            g_smem, stat_smem, q_bar, g_bar, k_bar, v_bar, kd_bar, consumed_bar, power, normalize, scale,
            num_heads, group, stages, dtype, dv, y_smem=None, y_low_smem=None, q_main_smem=None,
            staging_smem=None):
    y_low_ref, stat_ref = refs if len(refs) == 2 else (None, *refs)
    head, batch, query_head, key_head = head_indices(num_heads, group)
    # Powers run their longest programs first (see longest_first); exp keeps the grid order, in which it measured
    # 4-5% faster on the H200 at 8k tokens.
    program = lax.axis_index("rows") if power == "exp" else longest_first(t_ref.shape[1])
    wg = lax.axis_index("wg")
    walk = program + 1  # key tiles p, p - 1, ..., 0: the diagonal first

    smem = {"k_smem": k_smem, "k_bar": k_bar, "v_smem": v_smem, "v_bar": v_bar, "kd_smem": kd_smem, "kd_bar": kd_bar}
    issue, wait_tile = ring_copies(key_ring(k_ref, v_ref, kd_ref, head, batch, key_head), smem,
                                   lambda step: program - step)

    pl.when(wg == 2)(lambda: stream(walk, stages, consumed_bar, issue))

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        rows = pl.ds(program * KEY_TILE + wg * BLOCK, BLOCK)  # this warpgroup's half of the decay block
        plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, query_head], q_smem.at[wg], q_bar.at[wg])
        plgpu.copy_gmem_to_smem(g_ref.at[head, rows], g_smem.at[wg], g_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])
        plgpu.barrier_wait(g_bar.at[wg])
        g_row = plgpu.load(g_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
        if q_main_smem is not None:  # q' = scale q exp(g / p), for the tiles off the diagonal
            fold_rows(q_smem.at[wg], q_main_smem.at[wg], scale * jnp.exp2(g_row / power))
        staging = None if staging_smem is None else staging_smem.at[wg]
        tile = (BLOCK, KEY_TILE)

        def visit(step, carry, diagonal):
            """One key tile: (acc, row sum, row max, r) -> the same after it; r = the log2-decay of the blocks
            between this tile and the query block (the diagonal's is -T_I, so that g_i + kd_j + r = g_i - g_j)."""
            acc, den, row_max, r = carry
            slot = lax.rem(step, jnp.int32(stages))
            wait_tile(slot)
            kd_col = plgpu.load(kd_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            queries = q_smem if diagonal or q_main_smem is None else q_main_smem
            s = matmul(queries.at[wg], k_smem.at[slot].transpose((1, 0)), tile)
            p, rescale, row_max = _tile_weights(s, g_row, kd_col + r, row_max, power=power, normalize=normalize,
                                                scale=scale, diagonal=diagonal, row_offset=wg * BLOCK)
            if rescale is not None:
                acc = acc * lax.broadcast_in_dim(rescale, acc.shape, [0])
                den = den * rescale
            p_matmul = p.astype(dtype)
            # For the backward of a normalized power (y_low wanted), the diagonal tile sums its weights as the
            # matmul reads them, so that a row whose weights all lie there (a document's first tokens) has y and
            # den from the same rounded weights (see pallas._normalized_cotangents). Only there: converting every
            # tile's weights back measured 1.26 -> 1.91 ms for the forward at 4x8192 on the H200.
            exact = diagonal and y_low_ref is not None
            den = den + (p_matmul.astype(jnp.float32) if exact else p).sum(axis=1)
            acc = matmul_into(acc, p_matmul, v_smem.at[slot], staging)
            plgpu.barrier_arrive(consumed_bar.at[slot])
            return acc, den, row_max, r + t_ref[head, program - step]

        acc = plgpu.layout_cast(jnp.zeros((BLOCK, dv), jnp.float32), plgpu.Layout.WGMMA)
        den = plgpu.layout_cast(jnp.zeros((BLOCK,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        row_max = plgpu.layout_cast(jnp.full((BLOCK,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        carry = visit(jnp.int32(0), (acc, den, row_max, -t_ref[head, program]), diagonal=True)
        acc, den, row_max, _ = lax.fori_loop(1, walk, functools.partial(visit, diagonal=False), carry)

        stat = (row_max + jnp.log2(den)) / LOG2E if power == "exp" and normalize else den
        if normalize:
            acc = acc * lax.broadcast_in_dim(1.0 / jnp.maximum(den, NORMALIZER_EPS), acc.shape, [0])
        y_tile = (q_smem if y_smem is None else y_smem).at[wg]  # the walk's matmuls have read q and q'
        y = acc.astype(y_tile.dtype)
        y_tile[...] = y
        if y_low_ref is not None:
            y_low_tile = (q_main_smem if y_low_smem is None else y_low_smem).at[wg]
            y_low_tile[...] = (acc - y.astype(jnp.float32)).astype(y_low_tile.dtype)
        stat_smem.at[wg][...] = stat
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_tile, y_ref.at[batch, rows, query_head])
        if y_low_ref is not None:
            plgpu.copy_smem_to_gmem(y_low_tile, y_low_ref.at[batch, rows, query_head])
        plgpu.copy_smem_to_gmem(stat_smem.at[wg], stat_ref.at[head, rows])
        plgpu.wait_smem_to_gmem(0)


def _tile_weights(s, g_row, key_decay, row_max, *, power, normalize, scale, diagonal, row_offset):
    """(weights, rescale of the running sums or None, new row max) of one forward tile from its q.k ``s`` (for
    powers off the diagonal q'.k: the scale and the rows' decay are in q'); ``key_decay`` = kd_j + r per key."""
    tile = s.shape
    mask = causal_mask(tile, row_offset=row_offset) if diagonal else None
    if power == "exp":
        logits = s * (scale * LOG2E) + rows_plus_cols(g_row, key_decay, tile)
        if diagonal:
            logits = jnp.where(mask, logits, -jnp.inf)
        if not normalize:
            return jnp.exp2(logits), None, row_max
        new_max = jnp.maximum(row_max, logits.max(axis=1))
        p = jnp.exp2(logits - lax.broadcast_in_dim(new_max, tile, [0]))
        return p, jnp.exp2(row_max - new_max), new_max
    if diagonal:  # g_i - g_j, masked: exp(g_i) exp(-g_j) could overflow
        s = s * scale
        decay = diagonal_decay(rows_plus_cols(g_row, key_decay, tile), mask)
    else:  # one factor per key (<= 1); the rows' are in q'
        decay = lax.broadcast_in_dim(jnp.exp2(key_decay), tile, [1])
    return (s if power == 1 else s * s) * decay, None, row_max


def diagonal_decay(log_decay, mask):
    """``exp2(g_i - g_j)`` of a diagonal tile from its base-2 log-decays, exactly 0 where ``mask`` is False
    (masked before the exponential: a positive difference there could overflow, and inf * 0 is NaN)."""
    return jnp.exp2(jnp.where(mask, jnp.minimum(log_decay, 0.0), -jnp.inf))


def rows_plus_cols(row_vector, col_vector, shape):
    """``row_vector[i] + col_vector[j]`` over a (rows, cols) tile in the wgmma layout."""
    return lax.broadcast_in_dim(row_vector, shape, [0]) + lax.broadcast_in_dim(col_vector, shape, [1])


def causal_mask(shape, transposed=False, row_offset=0):
    """Row index + ``row_offset`` >= column index (query >= key) on a diagonal tile; ``transposed``: the tile is
    (keys, queries)."""
    rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + row_offset
    cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
    return cols >= rows if transposed else rows >= cols
