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
- ``_normalizer_kernel``, grid (B H P,): warpgroup 0 carries the normalizer ``Z = sum e^(decay) k k^T`` (d x d)
  the same way (readout ``den += rowsum((q * scale^2 e^g) Z * q)``); warpgroup 1 adds each chunk's intra-chunk
  part, the masked quadratic ``W = (scale q k^T)^2 e^(g_i - g_j)``, to y and its row sums to den. Where B H alone
  leaves SMs idle, each head's chunks split into P parts (``walk_parts``), each walked by its own program
  from the Z it starts with (``walk_starts``: a two-level scan over the parts' own walks).

y / den is taken outside. Head dims 64 (dk = dv = 64), one key head per query head, bfloat16 operands, float32
states and accumulators. The helpers after ``forward`` serve the backward kernels (``mosaic_gpu_backward.py``) too.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from twomamba_jax.kernels.layout import heads_first
from twomamba_jax.kernels.parallel.mosaic_gpu import (LOG2E, causal_mask, diagonal_decay, interpret_params, matmul,
                                                      matmul_add, matmul_into, matmuls, ring_copies, smem_tile,
                                                      stream)
from twomamba_jax.kernels.parallel.mosaic_gpu_backward import add_to_global, to_global
from twomamba_jax.ops.features import _symmetric_pairs

CHUNK = 64  # tokens per chunk: the M of every wgmma
HEAD_DIM = 64  # dk = dv: a state row S_a is one 64 x 64 accumulator
ROWS_PER_WARPGROUP = 4  # state rows a per compute warpgroup (registers)
ROWS_PER_PROGRAM = 2 * ROWS_PER_WARPGROUP
PROGRAMS = 132  # one program an SM (H100, H200): how many a walk split into parts may spread over
MIN_PART_CHUNKS = 16  # chunks a part walks, at least (shorter ones spend more on summaries than they save)
WGMMA = plgpu.Layout.WGMMA
F32 = jnp.float32


def unsupported_reason(q, k, v, *, power, normalize=None) -> str | None:
    """Why these kernels (or, for power 1, those of ``mosaic_gpu_power1.py``) do not take the inputs, or None."""
    if power not in (1, 2):
        return f"power={power!r} (the Hopper chunked kernels take powers 1 and 2)"
    if power == 1 and normalize:
        return f"normalize={normalize!r} at power 1 (the Hopper chunked kernels take power 1 unnormalized)"
    if (q.shape[-1], v.shape[-1]) != (HEAD_DIM, HEAD_DIM):
        return f"head dims dk={q.shape[-1]}, dv={v.shape[-1]} (the Hopper chunked kernels take {HEAD_DIM})"
    if q.dtype != jnp.bfloat16 or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype} (the Hopper chunked kernels take bfloat16)"
    if k.shape[2] != q.shape[2]:
        return f"{k.shape[2]} key heads for {q.shape[2]} query heads (the Hopper chunked kernels take one each)"
    return None


def _pairs(dim):
    """(rows, cols, weights, index, diagonal) of the d(d+1)/2 symmetric features of head dim d: pair p holds
    S[rows[p], cols[p]] times weights[p] (sqrt(2) off the diagonal); index (d, d) is the pair of (a, b) and of
    (b, a)."""
    rows, cols, weights = _symmetric_pairs(dim)
    index = np.zeros((dim, dim), np.int32)
    index[rows, cols] = index[cols, rows] = np.arange(len(rows))
    return rows, cols, weights, index, rows == cols


def _dim(features):
    """The head dim d of d(d+1)/2 symmetric features."""
    return int(round((np.sqrt(8 * features + 1) - 1) / 2))


def _spread(numerator, normalizer, factors):
    """Symmetric (..., F, dv), (..., F) -> full (..., d, d, dv), (..., d, d) float32: X[a, b] = X_sym[p] * factors[p]
    for p the pair of (a, b). A gather (no scatter, whose constant-folding XLA spends half a minute on)."""
    index = _pairs(_dim(normalizer.shape[-1]))[3]
    per_entry = np.asarray(factors, np.float32)[index]
    return (jnp.take(numerator.astype(F32), index, axis=-2) * per_entry[..., None],
            jnp.take(normalizer.astype(F32), index, axis=-1) * per_entry)


def _fold(numerator, normalizer, factors):
    """Full (..., d, d, dv), (..., d, d) -> symmetric: X_sym[p] = (X[a, b] + X[b, a]) * factors[p], (a, b) = pair p."""
    rows, cols, *_ = _pairs(normalizer.shape[-1])
    factors = np.asarray(factors, np.float32)
    return ((numerator[..., rows, cols, :] + numerator[..., cols, rows, :]) * factors[:, None],
            (normalizer[..., rows, cols] + normalizer[..., cols, rows]) * factors)


def to_full(numerator, normalizer):
    """Symmetric-feature states (..., d(d+1)/2, dv) and (..., d(d+1)/2) -> the full layout (..., d, d, dv) and
    (..., d, d), float32: S[a, b] = S[b, a] = S_sym[pair(a, b)] / w_ab (w = sqrt(2) off the diagonal)."""
    weights = _pairs(_dim(normalizer.shape[-1]))[2]
    return _spread(numerator, normalizer, 1.0 / weights)


def to_symmetric(numerator, normalizer):
    """The inverse of ``to_full``, the two halves averaged (rounding leaves S[a, b] and S[b, a] a little apart)."""
    weights = _pairs(normalizer.shape[-1])[2]
    return _fold(numerator, normalizer, 0.5 * weights)


def to_full_transpose(d_numerator, d_normalizer):
    """``to_full``'s VJP: cotangents of the full layout -> of the symmetric features (each pair collects its
    two entries, the diagonal's once)."""
    _, _, weights, _, diagonal = _pairs(d_normalizer.shape[-1])
    return _fold(d_numerator, d_normalizer, np.where(diagonal, 0.5, 1.0) / weights)


def to_symmetric_transpose(d_numerator, d_normalizer):
    """``to_symmetric``'s VJP: cotangents of the symmetric features -> of the full layout."""
    _, _, weights, _, diagonal = _pairs(_dim(d_normalizer.shape[-1]))
    return _spread(d_numerator, d_normalizer, np.where(diagonal, 1.0, 0.5 * weights))


class Operands(NamedTuple):
    """What the kernels read, tokens padded to whole chunks (Np), as many as the walks' ``parts`` divide."""

    q: jax.Array  # (B, Np, H, d), as given
    k: jax.Array  # (B, Np, H, d)
    v: jax.Array  # (B, Np, H, dv)
    row_decay: jax.Array  # (B H, Np) scale^power e^g: the readout's factor per token
    key_decay: jax.Array  # (B H, Np) e^(g_L - g): the update's
    chunk_decay: jax.Array  # (B H, chunks) e^(g_L): the carried state's
    log2_decay: jax.Array  # (B H, Np) g log2(e), for the intra-chunk tiles
    row_factors: jax.Array  # (B H, d, Np) r_a = scale^2 q_a e^g per row a of the state, rows first
    key_factors: jax.Array  # (B H, d, Np) u_a = k_a e^(g_L - g)
    parts: int  # of each head's chunks, for the single-state walks (``walk_parts``)


def pad_tokens(x, padded):
    """(B, N, ...) -> (B, Np, ...), zeros after the last token."""
    return jnp.pad(x, [(0, 0), (0, padded - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def operands(q, k, v, log_decay, scale, power=2, parts=None) -> Operands:
    """The kernels' operands from the mixer's: q, k, v (B, N, H, d), log_decay (B, N, H); the readout's factor
    per token is scale^power e^g (power 1's kernels use no per-row factors: jit drops them). ``parts``: of the
    single-state walks (default ``walk_parts``; a backward takes its forward's)."""
    batch, length, heads, _ = q.shape
    bh, num_chunks = batch * heads, -(-length // CHUNK)
    parts = walk_parts(bh, num_chunks) if parts is None else parts
    num_chunks = -(-num_chunks // parts) * parts  # zero tokens after the last change nothing (decay 1, k = v = 0)
    padded = num_chunks * CHUNK
    q, k, v = (pad_tokens(x, padded) for x in (q, k, v))
    gamma = jnp.cumsum(heads_first(log_decay.astype(F32), padded).reshape(bh, num_chunks, CHUNK), -1)
    last = gamma[..., -1:]
    row_decay = (scale**power * jnp.exp(gamma)).reshape(bh, padded)
    key_decay = jnp.exp(last - gamma).reshape(bh, padded)
    by_rows = lambda x, factor: jnp.swapaxes(heads_first(x.astype(F32), padded) * factor[..., None], 1, 2)
    return Operands(q, k, v, row_decay, key_decay, jnp.exp(last[..., 0]), gamma.reshape(bh, padded) * LOG2E,
                    by_rows(q, row_decay), by_rows(k, key_decay), parts)


def forward(q, k, v, log_decay, numerator0, normalizer0, *, scale, parts=None, stages=2, interpret=False):
    """The chunked power-2 forward on Hopper, token-major operands (as the model holds them).

    q, k, v: (B, N, H, 64) bfloat16; log_decay: (B, N, H) float32 (<= 0);
    numerator0: (B H, 64, 64, 64), normalizer0: (B H, 64, 64) float32, the initial states in the full layout
    (``to_full``). ``parts``: of the normalizer's walk (default ``walk_parts``). ``interpret``: run in the Mosaic
    GPU interpreter. Returns the unnormalized output (B, N, H, 64) and the normalizer of every token (B H, N),
    float32, the final states in the full layout, and the state each part of the normalizer's walk starts from
    (``walk_starts``; the backward's walk reads it again).
    """
    batch, length, heads, dim = q.shape
    if reason := unsupported_reason(q, k, v, power=2):
        raise ValueError(f"q, k, v: {reason}")
    interpret = interpret_params(interpret)
    ops = operands(q, k, v, log_decay, scale, parts=parts)
    bh, padded = ops.row_decay.shape
    y = jax.new_ref(jnp.zeros((2 if interpret else 1, batch, padded, heads, dim), F32))
    common = dict(num_heads=heads, stages=stages, num_chunks=padded // CHUNK, interpret=interpret)
    numerator = launch(functools.partial(_numerator_kernel, **common), "twomamba_chunked_numerator",
                       jax.ShapeDtypeStruct((bh, dim, dim, dim), F32),
                       {**ring_scratch(stages, q.dtype, "qkv", row_blocks("rq", "rk")),
                        **own_scratch(q.dtype, interpret)},
                       row_grid(bh), interpret)(
        ops.q, ops.k, ops.v, ops.row_factors, ops.key_factors, ops.chunk_decay, numerator0, y)
    parts = ops.parts
    z0 = walk_starts(ops.k, ops.k, ops.key_decay, ops.chunk_decay, normalizer0, num_heads=heads, parts=parts,
                     stages=stages, interpret=interpret)
    den, normalizer = launch(
        functools.partial(_normalizer_kernel, scale=scale, parts=parts, **common), "twomamba_chunked_normalizer",
        (jax.ShapeDtypeStruct((2, bh, padded), F32), jax.ShapeDtypeStruct((bh * parts, dim, dim), F32)),
        {**ring_scratch(stages, q.dtype, "qkv", vectors("er", "ek", "g_rows", "g_cols")),
         **own_scratch(q.dtype, interpret), "den_smem": plgpu.SMEM((2, CHUNK), F32)}, head_grid(bh, parts),
        interpret)(ops.q, ops.k, ops.v, ops.row_decay, ops.key_decay, ops.log2_decay, ops.log2_decay,
                   ops.chunk_decay, z0, y)
    y = y[...].sum(0) if interpret else y[...][0]
    normalizer = normalizer.reshape(bh, parts, dim, dim)[:, -1]
    return y[:, :length], den.sum(0)[:, :length], numerator, normalizer, z0


def launch(kernel, name, out_type, scratch, grid, interpret):
    """A kernel of two compute warpgroups and one memory warpgroup over ``grid`` = (sizes, names)."""
    return plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=grid[0], grid_names=grid[1],
                        num_threads=3, thread_name="wg", kernel_name=name,
                        compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret)


def row_grid(bh):
    """One program per (head of B H, 8 rows of its state)."""
    return (bh, HEAD_DIM // ROWS_PER_PROGRAM), ("heads", "rows")


def head_grid(bh, parts=1):
    """One program per head of B H and part of its chunks."""
    return (bh * parts,), ("heads",)


def row_blocks(*names):
    """Ring entries of a program's 8 rows of per-row factors a chunk, (8, C) float32."""
    return {name: (ROWS_PER_PROGRAM, CHUNK) for name in names}


def vectors(*names):
    """Ring entries of one float32 value per token, (C,)."""
    return {name: (CHUNK,) for name in names}


def ring_scratch(stages, dtype, tiles, per_token, consumers=2):
    """The ring of chunk tiles: ``tiles`` (names of (C, 64) tiles in ``dtype``) and ``per_token`` (name ->
    per-slot shape, float32), their barriers, and the slots' ``consumed_bar`` (``consumers`` warpgroups arrive);
    ``f32_consumed_bar`` for ``send_rows``."""
    scratch = {"consumed_bar": plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
               "f32_consumed_bar": plgpu.Barrier(num_barriers=2)}
    for name in tiles:
        scratch[f"{name}_smem"] = smem_tile((stages, CHUNK, HEAD_DIM), dtype)
    for name, shape in per_token.items():
        scratch[f"{name}_smem"] = plgpu.SMEM((stages, *shape), F32)
    for name in (*tiles, *per_token):
        scratch[f"{name}_bar"] = plgpu.Barrier(num_barriers=stages)
    return scratch


def own_scratch(dtype, interpret):
    """Per compute warpgroup: a state as a wgmma operand (``state_smem``), scaled values (``vals_smem``), a
    float32 tile for states in and out and for outputs, and in the interpreter the staging and summing tiles
    (``matmul_into``, ``add_to_global``)."""
    tile = (2, CHUNK, HEAD_DIM)
    scratch = {"state_smem": smem_tile(tile, dtype), "vals_smem": smem_tile(tile, dtype),
               "f32_smem": smem_tile(tile, F32), "f32_bar": plgpu.Barrier(num_barriers=2)}
    if interpret:
        scratch.update(staging_smem=smem_tile(tile, dtype), sum_smem=smem_tile(tile, F32),
                       sum_bar=plgpu.Barrier(num_barriers=2))
    return scratch


def walk_order(first, steps, reverse=False):
    """The chunk of each step of a walk over chunks first .. first + steps - 1 (last to first if ``reverse``)."""
    return (lambda step: first + steps - 1 - step) if reverse else (lambda step: first + step)


def chunk_ring(smem, tiles, per_token, chunk_of_step):
    """(issue, wait_tile) of the ring: each step's chunk ``chunk_of_step(step)``, its ``tiles`` and ``per_token``
    entries (name -> function of the chunk's token slice giving the global source)."""
    return ring_copies([*tiles.items(), *per_token.items()], smem, chunk_of_step, size=CHUNK)


def token_tiles(refs, names, batch, head):
    """Ring sources of token-major (B, Np, H, d) operands: ``head``'s (C, d) tile of each chunk."""
    return {name: (lambda t, ref=ref: ref.at[batch, t, head]) for name, ref in zip(names, refs)}


def batch_and_head(head, num_heads):
    """(batch, query head) of a head of B H."""
    return lax.div(head, jnp.int32(num_heads)), lax.rem(head, jnp.int32(num_heads))


class HeadProgram(NamedTuple):
    """Where a program of one head and one part of its chunks stands (``head_program``)."""

    program: jax.Array  # of B H P: its row of per-program inputs and outputs
    head: jax.Array  # of B H
    batch: jax.Array
    query_head: jax.Array
    steps: int  # chunks it walks
    reverse: bool  # whether it walks them last to first
    chunk_of_step: object  # the chunk of step s of the walk
    wait_tile: object  # wait_tile(slot)
    rows_of: object  # rows_of(ref, c): chunk c's (C, d) rows of a token-major output


def head_program(smem, refs, names, per_token, num_heads, num_chunks, stages, reverse=False, parts=1):
    """The frame of a kernel of one program a head and part (``head_grid``): a head's chunks split into
    ``parts`` runs of equal length, each walked by its own program from the state ``walk_starts`` gives it.
    Starts the memory warpgroup streaming the part's tiles ``refs`` (token-major (B, Np, H, d), as ``names``)
    and ``per_token`` (name -> (B H, Np) ref), last chunk first if ``reverse``."""
    program = lax.axis_index("heads")
    head, part = lax.div(program, jnp.int32(parts)), lax.rem(program, jnp.int32(parts))
    batch, query_head = batch_and_head(head, num_heads)
    steps = num_chunks // parts
    chunk_of_step = walk_order(part * steps, steps, reverse)
    sources = {name: (lambda t, ref=ref: ref.at[head, t]) for name, ref in per_token.items()}
    issue, wait_tile = chunk_ring(smem, token_tiles(refs, names, batch, query_head), sources, chunk_of_step)
    pl.when(lax.axis_index("wg") == 2)(lambda: stream(jnp.int32(steps), stages, smem["consumed_bar"], issue))
    rows_of = lambda ref, c: ref.at[batch, pl.ds(c * CHUNK, CHUNK), query_head]
    return HeadProgram(program, head, batch, query_head, steps, reverse, chunk_of_step, wait_tile, rows_of)


def send_rows(smem, src_of_row):
    """Memory warpgroup: rows 0-3 of the program (``src_of_row(row)``, a (64, 64) float32 global tile) to
    compute warpgroup 0 and rows 4-7 to warpgroup 1, one at a time through each one's float32 tile."""
    bar, consumed = smem["f32_bar"], smem["f32_consumed_bar"]
    for w in range(2):
        for i in range(ROWS_PER_WARPGROUP):
            if i:
                plgpu.barrier_wait(consumed.at[w])
            plgpu.copy_gmem_to_smem(src_of_row(w * ROWS_PER_WARPGROUP + i), smem["f32_smem"].at[w], bar.at[w])
    for w in range(2):
        plgpu.barrier_wait(consumed.at[w])


def receive_rows(smem, wg):
    """Compute warpgroup ``wg``: its 4 rows from ``send_rows``, as wgmma accumulators."""
    rows = []
    for _ in range(ROWS_PER_WARPGROUP):
        plgpu.barrier_wait(smem["f32_bar"].at[wg])
        rows.append(plgpu.load(smem["f32_smem"].at[wg], layout=WGMMA))
        plgpu.barrier_arrive(smem["f32_consumed_bar"].at[wg])
    return rows


def scaled_rows(tile, factor):
    """``tile * factor[:, None]`` in float32, ``tile`` a (C, d) shared-memory ref, ``factor`` (C,) in the wgmma
    row layout."""
    x = plgpu.load(tile, layout=WGMMA).astype(F32)
    return x * lax.broadcast_in_dim(factor, x.shape, [0])


def row_sum_with(tile, x):
    """``sum_b tile[t, b] x[t, b]`` per row t, ``tile`` a shared-memory ref, ``x`` float32 in the wgmma layout."""
    return jnp.sum(plgpu.load(tile, layout=WGMMA).astype(F32) * x, axis=1)


def store(tile, value):
    """``value`` into a shared-memory tile that a wgmma reads next."""
    tile[...] = value.astype(tile.dtype)
    plgpu.commit_smem()


def zeros():
    return plgpu.layout_cast(jnp.zeros((CHUNK, HEAD_DIM), F32), WGMMA)


def own_tiles(smem, wg):
    """This warpgroup's state, values and float32 tiles, and in the interpreter its staging tile and its (tile,
    barrier) for sums (None on the GPU)."""
    staging = smem["staging_smem"].at[wg] if "staging_smem" in smem else None
    total = (smem["sum_smem"].at[wg], smem["sum_bar"].at[wg]) if "sum_smem" in smem else None
    return smem["state_smem"].at[wg], smem["vals_smem"].at[wg], smem["f32_smem"].at[wg], staging, total


def update(state, decay, x_tile, vals_tile, interpret):
    """``decay * state + x^T vals`` (the state's rows: x's columns)."""
    return matmul_add(state * decay, x_tile.transpose((1, 0)), vals_tile, interpret)


def loaders(smem):
    """(tile(name, slot), per-row factor(name, slot, row), per-token column(name, slot, axis)) of the ring."""
    tile = lambda name, slot: smem[f"{name}_smem"].at[slot]
    factor = lambda name, slot, row: plgpu.load(smem[f"{name}_smem"].at[slot, row], layout=WGMMA.reduce(1))
    column = lambda name, slot, axis: plgpu.load(smem[f"{name}_smem"].at[slot], layout=WGMMA.reduce(axis))
    return tile, factor, column


class RowProgram(NamedTuple):
    """Where a program over (B H, 8 state rows) stands (``row_program``)."""

    head: jax.Array  # of B H
    batch: jax.Array
    query_head: jax.Array
    wg: jax.Array  # this warpgroup
    first_row: jax.Array  # the program's first state row
    own_rows: list  # this compute warpgroup's 4 rows, of the program's 8
    wait_tile: object  # wait_tile(slot)
    chunk_of_step: object  # the chunk of step s of the walk


def row_program(smem, num_heads, tiles, per_token, initial, num_chunks, stages, reverse=False):
    """The frame of the kernels over (B H, 8 state rows): starts the memory warpgroup, which sends the program's
    rows of ``initial`` (B H, d, d, dv) to the compute warpgroups, then streams every chunk's ``tiles`` (name ->
    token-major (B, Np, H, d) ref) and ``per_token(head, first_row)`` (name -> source of the chunk's token
    slice), last chunk first if ``reverse``."""
    head = lax.axis_index("heads")
    batch, query_head = batch_and_head(head, num_heads)
    first_row = lax.axis_index("rows") * ROWS_PER_PROGRAM
    wg = lax.axis_index("wg")
    chunk_of_step = walk_order(0, num_chunks, reverse)
    issue, wait_tile = chunk_ring(smem, token_tiles(tiles.values(), tiles, batch, query_head),
                                  per_token(head, first_row), chunk_of_step)
    prologue = lambda: send_rows(smem, lambda row: initial.at[head, first_row + row])
    pl.when(wg == 2)(lambda: stream(jnp.int32(num_chunks), stages, smem["consumed_bar"], issue, prologue=prologue))
    own_rows = [wg * ROWS_PER_WARPGROUP + i for i in range(ROWS_PER_WARPGROUP)]
    return RowProgram(head, batch, query_head, wg, first_row, own_rows, wait_tile, chunk_of_step)


def rows_to_global(p, values, tile, dst):
    """This warpgroup's state rows ``values`` (in ``p.own_rows`` order) -> their rows of ``dst`` (d, d, dv) in
    global memory, through the float32 ``tile``."""
    to_global([(value, tile, dst.at[p.first_row + row]) for row, value in zip(p.own_rows, values)])


def row_blocks_of(refs, head, first_row):
    """``per_token`` sources of the program's 8 rows of (B H, d, Np) per-row factors."""
    return {name: (lambda t, ref=ref: ref.at[head, pl.ds(first_row, ROWS_PER_PROGRAM), t])
            for name, ref in refs.items()}


class Readout(NamedTuple):
    """One product a ``state_walk`` reads out of the state before each chunk: ``(tile * factor) S`` (C, 64), or
    ``(tile * factor) S^T`` if ``transposed``; ``tile`` names a (C, 64) ring tile, ``factor`` a per-token one."""

    tile: str
    factor: str
    transposed: bool = False


def state_walk(smem, wg, p, s0, cd_ref, products, update_with, readout, write, *, stages, interpret, keep=None):
    """Compute warpgroup ``wg`` carrying one (64, 64) float32 state from ``s0`` (a global tile) over the chunks of
    ``p`` (a ``HeadProgram``), in the order the ring streams them: ``S <- e^(g_L) S + keys^T (values * factor)``,
    ``update_with`` = (keys, values, factor) naming ring entries, e^(g_L) of chunk c ``cd_ref[head, c]``.

    Per chunk, for the state before its update, each of ``products`` (``Readout``s) gives ``(tile * factor) S``
    (or ``S^T``), (C, 64) float32; ``readout(slot, results)`` makes of them what the chunk writes while its tiles
    are held, and ``write(c, that)`` runs once they are released. ``keep(c, S)`` gets the state at the boundary
    after chunk c: a forward walk's updated state, a reverse walk's (``p.reverse``) incoming one. Returns the last
    state."""
    state_tile, vals_tile, f32_tile, staging, _ = own_tiles(smem, wg)
    tile, _, column = loaders(smem)
    keys, values, value_factor = update_with
    plgpu.copy_gmem_to_smem(s0, f32_tile, smem["f32_bar"].at[wg])
    plgpu.barrier_wait(smem["f32_bar"].at[wg])

    def step(s, state):
        c = p.chunk_of_step(s)
        if keep is not None and p.reverse:
            keep(c, state)
        slot = lax.rem(s, jnp.int32(stages))
        p.wait_tile(slot)
        # The readouts and the update are independent: both operands staged, all issued together, one wait.
        state_tile[...] = state.astype(state_tile.dtype)
        vals_tile[...] = scaled_rows(tile(values, slot), column(value_factor, slot, 1)).astype(vals_tile.dtype)
        plgpu.commit_smem()
        reads = [(i, scaled_rows(tile(r.tile, slot), column(r.factor, slot, 1)).astype(state_tile.dtype),
                  state_tile.transpose((1, 0)) if r.transposed else state_tile) for i, r in enumerate(products)]
        *results, state = matmuls([zeros() for _ in products] + [state * cd_ref[p.head, c]],
                                  reads + [(len(products), tile(keys, slot).transpose((1, 0)), vals_tile)],
                                  interpret, staging)
        result = readout(slot, results)
        plgpu.barrier_arrive(smem["consumed_bar"].at[slot])
        write(c, result)
        if keep is not None and not p.reverse:
            keep(c, state)
        return state

    return lax.fori_loop(jnp.int32(0), jnp.int32(p.steps), step, plgpu.load(f32_tile, layout=WGMMA))


def walk_parts(batch_heads, num_chunks):
    """Parts each head's single-state walks split into: as many as keep B H P within ``PROGRAMS`` and each part
    at least ``MIN_PART_CHUNKS`` long (1 where B H alone fills the GPU). ``operands`` pads the chunks to a
    multiple of it (fewer than P chunks more)."""
    return max(1, min(PROGRAMS // batch_heads, num_chunks // MIN_PART_CHUNKS))


def walk_starts(keys, values, factor, chunk_decay, s0, *, num_heads, parts, reverse=False, stages=2,
                interpret=False):
    """The state each program of a walk in parts starts from, (B H P, 64, 64) float32 (P = ``parts``): a
    two-level scan. Each part's own contribution (its walk from zero, ``_part_kernel``, all parts at
    once) is combined across parts with their total decays (``lax.associative_scan``, log P deep).

    keys, values: token-major (B, Np, H, 64) bfloat16 and factor (B H, Np) float32 of the update
    ``S <- e^(g_L) S + keys^T (values * factor)``; chunk_decay (B H, chunks) its e^(g_L); s0 (B H, 64, 64) the
    state the first part starts from (of a ``reverse`` walk: the last)."""
    bh, num_chunks = chunk_decay.shape
    if parts == 1:
        return s0
    interpret = interpret_params(interpret)
    own = launch(functools.partial(_part_kernel, num_heads=num_heads, parts=parts, num_chunks=num_chunks,
                                   stages=stages, reverse=reverse, interpret=interpret),
                 "twomamba_chunked_part_walk", jax.ShapeDtypeStruct((bh * parts, HEAD_DIM, HEAD_DIM), F32),
                 {**ring_scratch(stages, keys.dtype, ("keys", "values"), vectors("factor"), consumers=1),
                  **own_scratch(keys.dtype, interpret)}, head_grid(bh, parts), interpret)(
        keys, values, factor, chunk_decay, jnp.zeros((HEAD_DIM, HEAD_DIM), F32))
    decay = jnp.prod(chunk_decay.reshape(bh, parts, -1), -1)
    # (decay, state) pairs compose as walks do; a reverse scan applies them last part first.
    compose = lambda a, b: (a[0] * b[0], b[0][..., None, None] * a[1] + b[1])
    through, carried = lax.associative_scan(compose, (decay, own.reshape(bh, parts, HEAD_DIM, HEAD_DIM)),
                                            reverse=reverse, axis=1)
    after = carried + through[..., None, None] * s0[:, None]  # each part's state once walked (from s0)
    first = s0[:, None]
    starts = jnp.concatenate([after[:, 1:], first] if reverse else [first, after[:, :-1]], axis=1)
    return starts.reshape(bh * parts, HEAD_DIM, HEAD_DIM)


def _part_kernel(keys_ref, values_ref, factor_ref, cd_ref, zero_ref, out_ref, *, num_heads, parts, num_chunks,
                 stages, reverse, interpret, **smem):
    p = head_program(smem, (keys_ref, values_ref), ("keys", "values"), {"factor": factor_ref}, num_heads,
                     num_chunks, stages, reverse=reverse, parts=parts)
    wg = lax.axis_index("wg")

    @pl.when(wg == 0)
    def _walk():
        plgpu.set_max_registers(232, action="increase")
        state = state_walk(smem, wg, p, zero_ref, cd_ref, [], ("keys", "values", "factor"), lambda *_: None,
                           lambda *_: None, stages=stages, interpret=interpret)
        to_global([(state, smem["f32_smem"].at[wg], out_ref.at[p.program])])


def _numerator_kernel(q_ref, k_ref, v_ref, rq_ref, rk_ref, cd_ref, s0_ref, y_ref, s_ref, *, num_heads, stages,
                      num_chunks, interpret, **smem):
    p = row_program(smem, num_heads, {"q": q_ref, "k": k_ref, "v": v_ref},
                    lambda head, first_row: row_blocks_of({"rq": rq_ref, "rk": rk_ref}, head, first_row),
                    s0_ref, num_chunks, stages)
    head, wg = p.head, p.wg
    tile, factor, _ = loaders(smem)

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        state_tile, vals_tile, f32_tile, staging, total = own_tiles(smem, wg)

        def chunk(c, states):
            slot = lax.rem(c, jnp.int32(stages))
            p.wait_tile(slot)
            decay = cd_ref[head, c]
            y, updated = zeros(), []
            for row, state in zip(p.own_rows, states):
                store(state_tile, state)  # the state before the chunk, as the readout's operand
                queries = scaled_rows(tile("q", slot), factor("rq", slot, row)).astype(state_tile.dtype)
                y = matmul_into(y, queries, state_tile, staging)
                store(vals_tile, scaled_rows(tile("v", slot), factor("rk", slot, row)))
                updated.append(update(state, decay, tile("k", slot), vals_tile, interpret))
            plgpu.barrier_arrive(smem["consumed_bar"].at[slot])
            rows = pl.ds(c * CHUNK, CHUNK)
            add_to_global(y, f32_tile, y_ref.at[wg if interpret else 0, p.batch, rows, p.query_head], total)
            return tuple(updated)

        states = lax.fori_loop(jnp.int32(0), jnp.int32(num_chunks), chunk, tuple(receive_rows(smem, wg)))
        rows_to_global(p, states, f32_tile, s_ref.at[head])


def _normalizer_kernel(q_ref, k_ref, v_ref, er_ref, ek_ref, g_rows_ref, g_cols_ref, cd_ref, z0_ref, y_ref, den_ref,
                       z_ref, *, scale, num_heads, parts, stages, num_chunks, interpret, **smem):
    # g twice (rows and columns of the intra-chunk tile): layout inference gives a shared-memory vector one layout
    p = head_program(smem, (q_ref, k_ref, v_ref), "qkv",
                     {"er": er_ref, "ek": ek_ref, "g_rows": g_rows_ref, "g_cols": g_cols_ref}, num_heads, num_chunks,
                     stages, parts=parts)
    wg = lax.axis_index("wg")
    tile, _, column = loaders(smem)

    def write_den(den, c):
        den_tile = smem["den_smem"].at[wg]
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        den_tile[...] = den
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(den_tile, den_ref.at[wg, p.head, pl.ds(c * CHUNK, CHUNK)])

    @pl.when(wg == 0)
    def _normalizer():
        plgpu.set_max_registers(232, action="increase")
        z = state_walk(smem, wg, p, z0_ref.at[p.program], cd_ref, [Readout("q", "er")], ("k", "k", "ek"),
                       lambda slot, results: row_sum_with(tile("q", slot), results[0]),
                       lambda c, den: write_den(den, c), stages=stages, interpret=interpret)  # den = q (er Z q)
        to_global([(z, smem["f32_smem"].at[wg], z_ref.at[p.program])])

    @pl.when(wg == 1)
    def _intra():
        plgpu.set_max_registers(232, action="increase")
        _, _, f32_tile, staging, total = own_tiles(smem, wg)

        @pl.loop(jnp.int32(0), jnp.int32(p.steps))
        def _(s):
            c, slot = p.chunk_of_step(s), lax.rem(s, jnp.int32(stages))
            p.wait_tile(slot)
            weights = intra_weights(tile, column, slot, scale, power=2).astype(q_ref.dtype)
            den = jnp.sum(weights.astype(F32), axis=1)  # the weights as the matmul reads them
            y = matmul_into(zeros(), weights, tile("v", slot), staging)
            plgpu.barrier_arrive(smem["consumed_bar"].at[slot])
            add_to_global(y, f32_tile, p.rows_of(y_ref.at[0], c), total)
            write_den(den, c)

        plgpu.wait_smem_to_gmem(0)


def intra_gradients(tile, column, slot, *, power, scale, ds_tile, w_tile, staging, interpret, dden=None):
    """(dq, dk, dv) (C, 64) float32 of one chunk's intra-chunk part ``W v``, W = (scale q k^T)^power e^(g_i - g_j)
    masked to j <= i, from the ring's q, k, v, dy tiles (and, for a normalized power, ``dden`` (C,) in the row
    layout: dW += dden): dq = dS k, dk = dS^T q, dv = W^T dy with dS = dW * dW/d(q.k). The two products that need
    nothing else, then the three, each issued together (``matmuls``); ``ds_tile``, ``w_tile``: (C, C) operands."""
    shape = (CHUNK, CHUNK)
    scores, d_weights = matmuls([zeros(), zeros()], [(0, tile("q", slot), tile("k", slot).transpose((1, 0))),
                                                     (1, tile("dy", slot), tile("v", slot).transpose((1, 0)))],
                                interpret, staging)
    log_decay = (lax.broadcast_in_dim(column("g_rows", slot, 1), shape, [0])
                 - lax.broadcast_in_dim(column("g_cols", slot, 0), shape, [1]))
    decay, scores = diagonal_decay(log_decay, causal_mask(shape)), scores * scale
    if dden is not None:
        d_weights = d_weights + lax.broadcast_in_dim(dden, shape, [0])
    d_scores = d_weights * decay * scale * (2.0 * scores if power == 2 else 1.0)  # of the raw q.k
    ds_tile[...] = d_scores.astype(ds_tile.dtype)
    w_tile[...] = (scores * scores * decay if power == 2 else scores * decay).astype(w_tile.dtype)
    plgpu.commit_smem()
    return matmuls([zeros(), zeros(), zeros()], [(0, ds_tile, tile("k", slot)),
                                                 (1, ds_tile.transpose((1, 0)), tile("q", slot)),
                                                 (2, w_tile.transpose((1, 0)), tile("dy", slot))], interpret, staging)


def intra_weights(tile, column, slot, scale, power):
    """A chunk's (C, C) weights ``(scale q k^T)^power e^(g_i - g_j)`` masked to j <= i, float32, from the ring's
    q and k tiles and g (base 2) as rows and as columns."""
    shape = (CHUNK, CHUNK)
    scores = matmul(tile("q", slot), tile("k", slot).transpose((1, 0)), shape) * scale
    log_decay = (lax.broadcast_in_dim(column("g_rows", slot, 1), shape, [0])
                 - lax.broadcast_in_dim(column("g_cols", slot, 0), shape, [1]))
    return (scores * scores if power == 2 else scores) * diagonal_decay(log_decay, causal_mask(shape))
