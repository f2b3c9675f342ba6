"""Pallas kernels of the chunked algorithm for TPU (Mosaic); on CPU they run in the TPU interpret mode.

The same three kernels as ``triton.py``, with the same signatures and results, laid out for the TPU:

- Every tile arrives through a BlockSpec, double-buffered into VMEM by the Pallas pipeline, and obeys the (8, 128)
  rule: token tiles are (C, d) with C a multiple of 8 and d the whole head; power-2 feature blocks are 128 wide
  (one MXU pass); per-token vectors travel as columns (C, 1) or as rows (1, C) (for ``g_j`` in ``g_i - g_j``),
  both free reshapes of the (B*H, N_pad) arrays.
- ``state_pass``: grid (B*H, feature blocks, chunks), the chunk axis "arbitrary": the state block (BF, dv) and
  its normalizer (1, BF) live in VMEM scratch across it, and every step stores the state as it was before its
  chunk. ``reverse=True`` walks the chunks last to first through the index maps.
- ``chunk_outputs`` and ``chunk_grads``: grid (B*H, chunks, feature blocks), the feature axis "arbitrary": the
  first step does the chunk's masked quadratic part into VMEM accumulators, every step adds one feature block's
  inter-chunk part, and the last writes the results.

phi tiles are built on chip (``tiles.features``), and so are their one-hot selectors (d, BF), from the feature
block's int32 pair indices (``tiles.block_selectors``): only those travel, as (1, BF) blocks like the weights;
``chunk_grads`` reads (d, BF) blocks of selectors made outside, as the Triton one does (see ``features.py``).
Decays, cumulative sums, states and accumulators are float32, matmul operands the inputs' dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from twomamba_jax.kernels.chunked.tiles import (block_selectors, causal_decay, dot, features,
                                                features_and_factors, features_vjp)
from twomamba_jax.ops.numerics import NORMALIZER_EPS

_F32 = jnp.float32


LANES = 128
MAX_FEATURE_BLOCK = 4096  # features per program: a (4096, 128) float32 state block is 2 MiB of VMEM


def power2_feature_block(num_features: int) -> int:
    """Features per program of the power-2 kernels: the whole (lane-padded) feature axis when it fits, else its
    largest split into equal lane-aligned blocks. Few, wide blocks keep the MXU busy and the grid short (every
    grid step costs a fixed ~0.35 us); d = 64 (2080 features) takes one block of 2176, d = 128 (8256) five of 1664."""
    groups = -(-num_features // LANES)
    fitting = [n for n in range(1, groups + 1) if groups % n == 0 and n * LANES <= MAX_FEATURE_BLOCK]
    return max(fitting) * LANES


def _interpret(interpret: bool):
    # Uninitialized VMEM reads as NaN in the interpreter, so a kernel that reads scratch before writing it fails.
    return pltpu.InterpretParams(uninitialized_memory="nan") if interpret else False


def _params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _column(x):
    """(BH, Np) -> (BH, Np, 1): per-token values as (C, 1) tiles."""
    return x.reshape(*x.shape, 1)


def _row(x, chunk_size):
    """(BH, Np) -> (BH, nc, 1, C): per-token values as (1, C) tiles."""
    return x.reshape(x.shape[0], -1, 1, chunk_size)


def state_pass(x, values, token_decay, token_weights, chunk_decay, pair_rows, pair_cols, weights, state0,
               normalizer0, *, reverse, power, chunk_size, feature_block, interpret=False):
    """See ``triton.state_pass``: same arguments (bar the Triton tuning knobs), same results."""
    bh, padded_len, dk = x.shape
    dv = values.shape[-1]
    features_padded = state0.shape[1]
    num_chunks = padded_len // chunk_size
    block = feature_block
    last = num_chunks - 1

    def chunk(c):
        return last - c if reverse else c

    def kernel(x_ref, val_ref, td_ref, tw_ref, cd_ref, pr_ref, pc_ref, w_ref, s0_ref, z0_ref,
               s_ref, z_ref, sf_ref, zf_ref, state, norm):
        step = pl.program_id(2)

        @pl.when(step == 0)
        def _():
            state[...] = s0_ref[...]
            norm[...] = z0_ref[...]

        s_ref[...] = state[...].astype(s_ref.dtype)
        z_ref[...] = norm[...]
        x_c = x_ref[...]
        selectors = block_selectors(pr_ref[...], pc_ref[...], dk, x_c.dtype, power)
        phi = features(x_c, selectors, w_ref[...], power) * td_ref[...]  # (C, BF)
        decay = cd_ref[...]  # (1, 1)
        state[...] = decay * state[...] + dot(phi.T.astype(x_c.dtype), val_ref[...].astype(x_c.dtype))
        norm[...] = decay * norm[...] + jnp.sum(phi * tw_ref[...], axis=0, keepdims=True)

        @pl.when(step == last)
        def _():
            sf_ref[...] = state[...]
            zf_ref[...] = norm[...]

    tokens = lambda width: pl.BlockSpec((None, chunk_size, width), lambda h, f, c: (h, chunk(c), 0))
    feature_row = pl.BlockSpec((1, block), lambda h, f, c: (0, f))  # pair indices, weights
    per_chunk_state = pl.BlockSpec((None, None, block, dv), lambda h, f, c: (h, chunk(c), f, 0))
    per_chunk_norm = pl.BlockSpec((None, None, 1, block), lambda h, f, c: (h, chunk(c), 0, f))
    whole_state = pl.BlockSpec((None, block, dv), lambda h, f, c: (h, f, 0))
    whole_norm = pl.BlockSpec((None, 1, block), lambda h, f, c: (h, 0, f))
    out_shape = (
        jax.ShapeDtypeStruct((bh, num_chunks, features_padded, dv), x.dtype),
        jax.ShapeDtypeStruct((bh, num_chunks, 1, features_padded), _F32),
        jax.ShapeDtypeStruct((bh, features_padded, dv), _F32),
        jax.ShapeDtypeStruct((bh, 1, features_padded), _F32),
    )
    states, norms, state, norm = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(bh, features_padded // block, num_chunks),
        in_specs=[
            tokens(dk), tokens(dv), tokens(1), tokens(1),
            pl.BlockSpec((None, None, 1, 1), lambda h, f, c: (h, chunk(c), 0, 0)),
            feature_row, feature_row, feature_row,
            whole_state, whole_norm,
        ],
        out_specs=[per_chunk_state, per_chunk_norm, whole_state, whole_norm],
        scratch_shapes=[pltpu.VMEM((block, dv), _F32), pltpu.VMEM((1, block), _F32)],
        compiler_params=_params("parallel", "parallel", "arbitrary"),
        interpret=_interpret(interpret),
        name="twomamba_chunk_state_grads" if reverse else "twomamba_chunk_states",
    )(x, values, _column(token_decay), _column(token_weights), chunk_decay.reshape(bh, num_chunks, 1, 1),
      pair_rows, pair_cols, weights, state0, normalizer0.reshape(bh, 1, features_padded))
    return states, norms.reshape(bh, num_chunks, features_padded), state, norm.reshape(bh, features_padded)


def _chunk_specs(chunk_size, block, dk, dv):
    """BlockSpecs on the grid (B*H, chunks, feature blocks) of ``chunk_outputs`` and ``chunk_grads``."""
    return dict(
        tokens=lambda width: pl.BlockSpec((None, chunk_size, width), lambda h, c, f: (h, c, 0)),
        row=pl.BlockSpec((None, None, 1, chunk_size), lambda h, c, f: (h, c, 0, 0)),
        state=pl.BlockSpec((None, None, block, dv), lambda h, c, f: (h, c, f, 0)),
        norm=pl.BlockSpec((None, None, 1, block), lambda h, c, f: (h, c, 0, f)),
        feature_row=pl.BlockSpec((1, block), lambda h, c, f: (0, f)),  # pair indices, weights
        selector=pl.BlockSpec((dk, block), lambda h, c, f: (0, f)),  # one-hot selectors (chunk_grads)
    )


def _norm_rows(normalizers):
    """(BH, nc, F) -> (BH, nc, 1, F): normalizer blocks as (1, BF) rows."""
    return normalizers.reshape(*normalizers.shape[:2], 1, normalizers.shape[2])


def chunk_outputs(q, k, v, gamma, numerators, normalizers, pair_rows, pair_cols, weights, *, power, normalize,
                  chunk_size, feature_block, interpret=False):
    """See ``triton.chunk_outputs``: same arguments (bar the Triton tuning knobs), same results."""
    bh, padded_len, dk = q.shape
    dv = v.shape[-1]
    features_padded = numerators.shape[2]
    num_chunks = padded_len // chunk_size
    num_blocks = features_padded // feature_block

    def kernel(q_ref, k_ref, v_ref, gc_ref, gr_ref, s_ref, z_ref, pr_ref, pc_ref, w_ref, y_ref, den_ref,
               numerator, denominator):
        fblock = pl.program_id(2)
        q_c, g = q_ref[...], gc_ref[...]  # g: (C, 1)

        @pl.when(fblock == 0)
        def _():
            v_c = v_ref[...]
            scores = dot(q_c, k_ref[...], trans_b=True)
            scores = scores if power == 1 else scores * scores
            weights_ij = scores * causal_decay(g, gr_ref[...], chunk_size)[1]
            weights_ij = weights_ij.astype(v_c.dtype)  # summed as the matmul reads them
            numerator[...] = dot(weights_ij, v_c)
            denominator[...] = jnp.sum(weights_ij.astype(jnp.float32), axis=1, keepdims=True)

        selectors = block_selectors(pr_ref[...], pc_ref[...], dk, q_c.dtype, power)
        phi = features(q_c, selectors, w_ref[...], power) * jnp.exp(g)
        numerator[...] += dot(phi.astype(v_ref.dtype), s_ref[...].astype(v_ref.dtype))
        denominator[...] += jnp.sum(phi * z_ref[...], axis=1, keepdims=True)

        @pl.when(fblock == num_blocks - 1)
        def _():
            out = numerator[...]
            if normalize:
                out = out / jnp.maximum(denominator[...], NORMALIZER_EPS)
            y_ref[...] = out.astype(y_ref.dtype)
            den_ref[...] = denominator[...]

    spec = _chunk_specs(chunk_size, feature_block, dk, dv)
    y, den = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((bh, padded_len, dv), v.dtype),
                   jax.ShapeDtypeStruct((bh, padded_len, 1), _F32)),
        grid=(bh, num_chunks, num_blocks),
        in_specs=[spec["tokens"](dk), spec["tokens"](dk), spec["tokens"](dv), spec["tokens"](1), spec["row"],
                  spec["state"], spec["norm"], spec["feature_row"], spec["feature_row"], spec["feature_row"]],
        out_specs=[spec["tokens"](dv), spec["tokens"](1)],
        scratch_shapes=[pltpu.VMEM((chunk_size, dv), _F32), pltpu.VMEM((chunk_size, 1), _F32)],
        compiler_params=_params("parallel", "parallel", "arbitrary"),
        interpret=_interpret(interpret),
        name="twomamba_chunk_outputs",
    )(q, k, v, _column(gamma), _row(gamma, chunk_size), numerators, _norm_rows(normalizers), pair_rows, pair_cols,
      weights)
    return y, den.reshape(bh, padded_len)


def chunk_grads(q, k, v, gamma, key_decay, numerators, normalizers, d_states, d_normalizers, d_out, d_den,
                rows, cols, weights, *, power, chunk_size, feature_block, interpret=False):
    """See ``triton.chunk_grads``: same arguments (bar the Triton tuning knobs), same results."""
    bh, padded_len, dk = q.shape
    dv = v.shape[-1]
    features_padded = numerators.shape[2]
    num_chunks = padded_len // chunk_size
    num_blocks = features_padded // feature_block

    def kernel(q_ref, k_ref, v_ref, gc_ref, gr_ref, kd_ref, s_ref, z_ref, gs_ref, gz_ref, do_ref, dd_ref,
               rows_ref, cols_ref, w_ref, dq_ref, dk_ref, dv_ref, dg_ref, dq, dk_acc, dv_acc, d_gamma, d_last):
        fblock = pl.program_id(2)
        q_c, k_c, v_c = q_ref[...], k_ref[...], v_ref[...]
        dtype = q_c.dtype
        g, d_den_c = gc_ref[...], dd_ref[...]  # (C, 1) columns
        d_out_c = do_ref[...].astype(dtype)

        @pl.when(fblock == 0)
        def _():  # inside the chunk: W = f(s) * exp(g_i - g_j) on and below the diagonal
            scores = dot(q_c, k_c, trans_b=True)
            causal, decay = causal_decay(g, gr_ref[...], chunk_size)
            weights_ij = (scores if power == 1 else scores * scores) * decay
            d_weights = jnp.where(causal, dot(d_out_c, v_c, trans_b=True) + d_den_c, 0.0)
            d_scores = d_weights * decay * (1.0 if power == 1 else 2.0 * scores)
            dq[...] = dot(d_scores.astype(dtype), k_c)
            dk_acc[...] = dot(d_scores.T.astype(dtype), q_c)
            dv_acc[...] = dot(weights_ij.T.astype(dtype), d_out_c)
            through_decay = d_weights * weights_ij
            d_gamma[...] = (jnp.sum(through_decay, axis=1, keepdims=True)
                            - jnp.sum(through_decay.T, axis=1, keepdims=True))
            d_last[...] = jnp.zeros_like(d_last)

        selectors, w_b = (None if power == 1 else (rows_ref[...], cols_ref[...])), w_ref[...]
        state, norm = s_ref[...].astype(_F32), z_ref[...]  # (BF, dv), (1, BF)
        grad, grad_z = gs_ref[...].astype(_F32), gz_ref[...]
        inflow, key_decay_c = jnp.exp(g), kd_ref[...]
        q_phi, q_factors = features_and_factors(q_c, selectors, w_b, power)
        k_phi, k_factors = features_and_factors(k_c, selectors, w_b, power)
        q_feat = q_phi * inflow  # phi(q) exp(g)
        k_feat = k_phi * key_decay_c  # phi(k) exp(g_L - g)
        dv_acc[...] += dot(k_feat.astype(dtype), grad.astype(dtype))
        d_q_feat = dot(d_out_c, state.astype(dtype), trans_b=True) + d_den_c * norm
        d_k_feat = dot(v_c, grad.astype(dtype), trans_b=True) + grad_z
        dq[...] += features_vjp(d_q_feat * inflow, q_factors, selectors, w_b, power, dtype)
        dk_acc[...] += features_vjp(d_k_feat * key_decay_c, k_factors, selectors, w_b, power, dtype)
        through_keys = jnp.sum(d_k_feat * k_feat, axis=1, keepdims=True)
        d_gamma[...] += jnp.sum(d_q_feat * q_feat, axis=1, keepdims=True) - through_keys
        # The last gamma scales every key weight and, through alpha = exp(g_L), the carried state.
        alpha = jnp.exp(gr_ref[:, chunk_size - 1:])  # (1, 1)
        carried = jnp.sum(jnp.sum(grad * state, axis=1, keepdims=True), axis=0, keepdims=True)
        d_last[...] += (jnp.sum(through_keys, axis=0, keepdims=True)
                        + alpha * (carried + jnp.sum(grad_z * norm, axis=1, keepdims=True)))

        @pl.when(fblock == num_blocks - 1)
        def _():
            is_last = jax.lax.broadcasted_iota(jnp.int32, (chunk_size, 1), 0) == chunk_size - 1
            dq_ref[...] = dq[...]
            dk_ref[...] = dk_acc[...]
            dv_ref[...] = dv_acc[...]
            dg_ref[...] = d_gamma[...] + jnp.where(is_last, d_last[...], 0.0)

    spec = _chunk_specs(chunk_size, feature_block, dk, dv)
    tokens = spec["tokens"]
    out_shape = (
        jax.ShapeDtypeStruct((bh, padded_len, dk), _F32),
        jax.ShapeDtypeStruct((bh, padded_len, dk), _F32),
        jax.ShapeDtypeStruct((bh, padded_len, dv), _F32),
        jax.ShapeDtypeStruct((bh, padded_len, 1), _F32),
    )
    scratch = [pltpu.VMEM((chunk_size, dk), _F32), pltpu.VMEM((chunk_size, dk), _F32),
               pltpu.VMEM((chunk_size, dv), _F32), pltpu.VMEM((chunk_size, 1), _F32), pltpu.VMEM((1, 1), _F32)]
    dq, dk_, dv_, d_gamma = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(bh, num_chunks, num_blocks),
        in_specs=[tokens(dk), tokens(dk), tokens(dv), tokens(1), spec["row"], tokens(1), spec["state"],
                  spec["norm"], spec["state"], spec["norm"], tokens(dv), tokens(1), spec["selector"],
                  spec["selector"], spec["feature_row"]],
        out_specs=[tokens(dk), tokens(dk), tokens(dv), tokens(1)],
        scratch_shapes=scratch,
        compiler_params=_params("parallel", "parallel", "arbitrary"),
        interpret=_interpret(interpret),
        name="twomamba_chunk_grads",
    )(q, k, v, _column(gamma), _row(gamma, chunk_size), _column(key_decay), numerators, _norm_rows(normalizers),
      d_states, _norm_rows(d_normalizers), d_out, _column(d_den), rows, cols, weights)
    return dq, dk_, dv_, d_gamma.reshape(bh, padded_len)
