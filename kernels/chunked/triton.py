"""Pallas kernels of the chunked algorithm, written for the Triton lowering (GPU); they run in interpret mode on CPU.

Two launches, as the chunked form splits (SPEC section 2):

1. ``state_pass``: grid (B*H, feature blocks, value blocks). Each program walks the chunks in order, carrying its
   block of the state ``S`` (BF x BV) and normalizer ``z`` (BF) in registers, and writes the state *before* every
   chunk.
2. ``chunk_outputs``: grid (B*H, chunks), fully parallel. Each program computes its chunk's masked quadratic part
   and adds ``exp(gamma_i) phi(q_i)^T S_{c-1}``, looping over the feature blocks of the stored state.

The backward is the same two shapes: ``state_pass(..., reverse=True)`` carries the state cotangent from the last
chunk to the first, and ``chunk_grads`` turns it into dq, dk, dv and the log-decay cotangent, chunk by chunk.

phi tiles are built on chip from q and k and never written out; the forward kernels build their one-hot
selectors on chip too, from (1, BF) int32 rows of pair indices, while ``chunk_grads`` reads selectors made
outside (see ``features.py``). The tile math is in ``tiles.py``, shared with the TPU
kernels. Decays, cumulative sums, states and accumulators are float32; matmul operands are the inputs' dtype, so
with bfloat16 inputs the stored states are rounded to bfloat16 where a matmul reads them. Triton wants
power-of-two blocks and no slicing of values, so everything is sliced from refs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from twomamba_jax.kernels.chunked.tiles import (block_selectors, causal_decay, dot, features,
                                                features_and_factors, features_vjp)
from twomamba_jax.ops.numerics import NORMALIZER_EPS


def power2_feature_block(num_features: int) -> int:
    """Features per program of the power-2 kernels: 64 measured faster than 32 or 128 on the H200 (registers)."""
    del num_features
    return 64


MIN_PROGRAMS = 128  # about one per SM of an H100 / H200 (132)


def _value_block(programs: int, dv: int) -> int:
    """Values per state-pass program: dv, halved (down to 16) while fewer than MIN_PROGRAMS programs would run.
    Power 1 has one feature block, so at B*H = 16 the pass would otherwise occupy 16 SMs for the whole sequence."""
    block = dv
    while programs * (dv // block) < MIN_PROGRAMS and block > 16:
        block //= 2
    return block


def _compiler_params(num_warps, num_stages):
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def state_pass(x, values, token_decay, token_weights, chunk_decay, pair_rows, pair_cols, weights, state0,
               normalizer0, *, reverse, power, chunk_size, feature_block, interpret=False, num_warps=4,
               num_stages=2):
    """The recurrence over chunks, ``S <- alpha_c S + (phi(x_c) * d_c)^T values_c`` (and the normalizer
    ``z <- alpha_c z + (phi(x_c) * d_c)^T u_c``), storing S (and z) as it was before each chunk's update.

    Forward (``reverse=False``): x = k, values = v, d = exp(gamma_last - gamma), u = 1: the states before every
    chunk. Backward (``reverse=True``, chunks last to first): x = q, values = the numerator cotangent,
    d = exp(gamma), u = the normalizer cotangent: the state cotangents after every chunk.

    x: (BH, Np, dk); values: (BH, Np, dv); token_decay, token_weights: (BH, Np) float32; chunk_decay: (BH, nc)
    ``exp(gamma_last)``; pair_rows, pair_cols: (1, F) int32 pair indices, weights: (1, F) float32 (see
    ``features.py``); state0: (BH, F, dv), normalizer0: (BH, F), float32.
    Returns (per chunk S (BH, nc, F, dv) in x's dtype, per chunk z (BH, nc, F), the last S, the last z), float32
    but the per-chunk S: it is only ever read as a matmul operand in x's dtype, so storing it so halves the
    kernels' largest memory traffic with bfloat16 inputs and loses nothing.
    """
    bh, padded_len, dk = x.shape
    dv = values.shape[-1]
    num_features = state0.shape[1]
    num_chunks = padded_len // chunk_size
    block = feature_block
    value_block = _value_block(bh * (num_features // block), dv)

    def kernel(x_ref, val_ref, td_ref, tw_ref, cd_ref, pr_ref, pc_ref, w_ref, s0_ref, z0_ref,
               s_ref, z_ref, sf_ref, zf_ref):
        head, fblock, vblock = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        fs, vs = pl.ds(fblock * block, block), pl.ds(vblock * value_block, value_block)
        selectors = block_selectors(pr_ref[:, fs], pc_ref[:, fs], dk, x_ref.dtype, power)
        w_b = w_ref[:, fs]
        owns_normalizer = vblock == 0  # every value block computes z; the first stores it

        def step(i, carry):
            state, norm = carry
            c = num_chunks - 1 - i if reverse else i
            s_ref[head, c, fs, vs] = state.astype(s_ref.dtype)

            @pl.when(owns_normalizer)
            def _():
                z_ref[head, c, fs] = norm

            ts = pl.ds(c * chunk_size, chunk_size)
            x_c = x_ref[head, ts, :]
            phi = features(x_c, selectors, w_b, power) * td_ref[head, ts][:, None]
            decay = cd_ref[head, c]
            state = decay * state + dot(phi.T.astype(x_c.dtype), val_ref[head, ts, vs].astype(x_c.dtype))
            norm = decay * norm + jnp.sum(phi * tw_ref[head, ts][:, None], axis=0)
            return state, norm

        state, norm = jax.lax.fori_loop(0, num_chunks, step, (s0_ref[head, fs, vs], z0_ref[head, fs]))
        sf_ref[head, fs, vs] = state

        @pl.when(owns_normalizer)
        def _():
            zf_ref[head, fs] = norm

    f32 = jnp.float32
    out_shape = (
        jax.ShapeDtypeStruct((bh, num_chunks, num_features, dv), x.dtype),
        jax.ShapeDtypeStruct((bh, num_chunks, num_features), f32),
        jax.ShapeDtypeStruct((bh, num_features, dv), f32),
        jax.ShapeDtypeStruct((bh, num_features), f32),
    )
    name = "twomamba_chunk_state_grads" if reverse else "twomamba_chunk_states"
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(bh, num_features // block, dv // value_block), interpret=interpret,
        compiler_params=_compiler_params(num_warps, num_stages), name=name,
    )(x, values, token_decay, token_weights, chunk_decay, pair_rows, pair_cols, weights, state0, normalizer0)


def chunk_outputs(q, k, v, gamma, numerators, normalizers, pair_rows, pair_cols, weights, *, power, normalize,
                  chunk_size, feature_block, interpret=False, num_warps=4, num_stages=2):
    """Outputs of every chunk. q (pre-scaled), k: (BH, Np, dk); v: (BH, Np, dv); gamma: (BH, Np) float32 chunk-local
    cumulative log-decay; numerators, normalizers: the states before every chunk, from ``state_pass``.
    Returns y: (BH, Np, dv) in v's dtype, and the softmax normalizer (BH, Np) float32 (for the backward)."""
    bh, padded_len, dk = q.shape
    dv = v.shape[-1]
    num_features = numerators.shape[2]
    num_chunks = padded_len // chunk_size
    block = feature_block

    def kernel(q_ref, k_ref, v_ref, g_ref, s_ref, z_ref, pr_ref, pc_ref, w_ref, y_ref, den_ref):
        head, c = pl.program_id(0), pl.program_id(1)
        ts = pl.ds(c * chunk_size, chunk_size)
        q_c, v_c = q_ref[head, ts, :], v_ref[head, ts, :]
        g = g_ref[head, ts]
        scores = dot(q_c, k_ref[head, ts, :], trans_b=True)
        scores = scores if power == 1 else scores * scores
        weights_ij = scores * causal_decay(g[:, None], g[None, :], chunk_size)[1]
        weights_ij = weights_ij.astype(v_c.dtype)  # summed as the matmul reads them
        numerator = dot(weights_ij, v_c)
        denominator = jnp.sum(weights_ij.astype(jnp.float32), axis=1)
        inflow = jnp.exp(g)[:, None]

        def add_block(fblock, carry):
            numerator, denominator = carry
            fs = pl.ds(fblock * block, block)
            selectors = block_selectors(pr_ref[:, fs], pc_ref[:, fs], dk, q_c.dtype, power)
            phi = features(q_c, selectors, w_ref[:, fs], power) * inflow
            numerator = numerator + dot(phi.astype(v_c.dtype), s_ref[head, c, fs, :].astype(v_c.dtype))
            denominator = denominator + jnp.sum(phi * z_ref[head, c, fs][None, :], axis=1)
            return numerator, denominator

        numerator, denominator = jax.lax.fori_loop(0, num_features // block, add_block, (numerator, denominator))
        if normalize:
            numerator = numerator / jnp.maximum(denominator, NORMALIZER_EPS)[:, None]
        y_ref[head, ts, :] = numerator.astype(y_ref.dtype)
        den_ref[head, ts] = denominator

    out_shape = (jax.ShapeDtypeStruct((bh, padded_len, dv), v.dtype),
                 jax.ShapeDtypeStruct((bh, padded_len), jnp.float32))
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(bh, num_chunks),
        interpret=interpret, compiler_params=_compiler_params(num_warps, num_stages), name="twomamba_chunk_outputs",
    )(q, k, v, gamma, numerators, normalizers, pair_rows, pair_cols, weights)


def chunk_grads(q, k, v, gamma, key_decay, numerators, normalizers, d_states, d_normalizers, d_out, d_den,
                rows, cols, weights, *, power, chunk_size, feature_block, interpret=False, num_warps=4,
                num_stages=2):
    """Cotangents of q (pre-scaled), k, v and gamma, one program per chunk.

    numerators, normalizers: the states before every chunk (``state_pass``); d_states, d_normalizers: the
    cotangents of the states after every chunk (``state_pass(..., reverse=True)``); d_out (BH, Np, dv), d_den (BH, Np):
    cotangents of the unnormalized numerator and the normalizer; rows, cols: the one-hot selectors (dk, F) in q's
    dtype (``tiles.one_hot`` of the pair indices, made outside: built in here, where each is used four times, two
    of them transposed, they made forward + backward 17-26% slower on the H200). Returns dq, dk (BH, Np, dk),
    dv (BH, Np, dv) and d_gamma (BH, Np), float32; the cotangent of the chunk's last gamma includes the state's
    decay exp(gamma_last).
    """
    bh, padded_len, dk = q.shape
    dv = v.shape[-1]
    num_features = numerators.shape[2]
    num_chunks = padded_len // chunk_size
    block = feature_block

    def kernel(q_ref, k_ref, v_ref, g_ref, kd_ref, s_ref, z_ref, gs_ref, gz_ref, do_ref, dd_ref,
               rows_ref, cols_ref, w_ref, dq_ref, dk_ref, dv_ref, dg_ref):
        head, c = pl.program_id(0), pl.program_id(1)
        ts = pl.ds(c * chunk_size, chunk_size)
        q_c, k_c, v_c = q_ref[head, ts, :], k_ref[head, ts, :], v_ref[head, ts, :]
        dtype = q_c.dtype
        g, key_decay_c = g_ref[head, ts], kd_ref[head, ts]
        d_out_c, d_den_c = do_ref[head, ts, :], dd_ref[head, ts]

        # Inside the chunk: W = f(s) * exp(g_i - g_j) on and below the diagonal.
        scores = dot(q_c, k_c, trans_b=True)
        causal, decay = causal_decay(g[:, None], g[None, :], chunk_size)
        weights_ij = (scores if power == 1 else scores * scores) * decay
        d_weights = dot(d_out_c.astype(dtype), v_c, trans_b=True) + d_den_c[:, None]
        d_weights = jnp.where(causal, d_weights, 0.0)
        d_scores = d_weights * decay * (1.0 if power == 1 else 2.0 * scores)
        dq = dot(d_scores.astype(dtype), k_c)
        dk = dot(d_scores.T.astype(dtype), q_c)
        dv_c = dot(weights_ij.T.astype(dtype), d_out_c.astype(dtype))
        through_decay = d_weights * weights_ij
        d_gamma = jnp.sum(through_decay, axis=1) - jnp.sum(through_decay, axis=0)

        inflow = jnp.exp(g)[:, None]

        def add_block(fblock, carry):
            dq, dk, dv_c, d_gamma, d_keys, d_alpha = carry
            fs = pl.ds(fblock * block, block)
            selectors = None if power == 1 else (rows_ref[:, fs], cols_ref[:, fs])
            w_b = w_ref[:, fs]
            state, norm = s_ref[head, c, fs, :].astype(jnp.float32), z_ref[head, c, fs]
            grad, grad_z = gs_ref[head, c, fs, :].astype(jnp.float32), gz_ref[head, c, fs]
            q_phi, q_factors = features_and_factors(q_c, selectors, w_b, power)
            k_phi, k_factors = features_and_factors(k_c, selectors, w_b, power)
            q_feat = q_phi * inflow  # phi(q) exp(g)
            k_feat = k_phi * key_decay_c[:, None]  # phi(k) exp(g_L - g)
            dv_c = dv_c + dot(k_feat.astype(dtype), grad.astype(dtype))
            d_q_feat = dot(d_out_c.astype(dtype), state.astype(dtype), trans_b=True) + d_den_c[:, None] * norm
            d_k_feat = dot(v_c, grad.astype(dtype), trans_b=True) + grad_z[None, :]
            dq = dq + features_vjp(d_q_feat * inflow, q_factors, selectors, w_b, power, dtype)
            dk = dk + features_vjp(d_k_feat * key_decay_c[:, None], k_factors, selectors, w_b, power, dtype)
            through_keys = jnp.sum(d_k_feat * k_feat, axis=1)
            d_gamma = d_gamma + jnp.sum(d_q_feat * q_feat, axis=1) - through_keys
            # The last gamma scales every key weight and, through alpha = exp(g_L), the carried state.
            d_keys = d_keys + jnp.sum(through_keys)
            # One axis at a time: Triton lowers a 2-D sum as two reductions anyway.
            d_alpha = d_alpha + jnp.sum(jnp.sum(grad * state, axis=1)) + jnp.sum(grad_z * norm)
            return dq, dk, dv_c, d_gamma, d_keys, d_alpha

        zero = jnp.zeros((), jnp.float32)
        init = (dq, dk, dv_c, d_gamma, zero, zero)
        dq, dk, dv_c, d_gamma, d_keys, d_alpha = jax.lax.fori_loop(0, num_features // block, add_block, init)
        last = jax.lax.broadcasted_iota(jnp.int32, (chunk_size,), 0) == chunk_size - 1
        alpha = jnp.sum(jnp.where(last, jnp.exp(g), 0.0))  # exp(g_L), by a masked sum (no value slicing)
        d_gamma = d_gamma + jnp.where(last, d_keys + d_alpha * alpha, 0.0)
        dq_ref[head, ts, :] = dq
        dk_ref[head, ts, :] = dk
        dv_ref[head, ts, :] = dv_c
        dg_ref[head, ts] = d_gamma

    f32 = jnp.float32
    out_shape = (
        jax.ShapeDtypeStruct((bh, padded_len, dk), f32),
        jax.ShapeDtypeStruct((bh, padded_len, dk), f32),
        jax.ShapeDtypeStruct((bh, padded_len, dv), f32),
        jax.ShapeDtypeStruct((bh, padded_len), f32),
    )
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(bh, num_chunks), interpret=interpret,
        compiler_params=_compiler_params(num_warps, num_stages), name="twomamba_chunk_grads",
    )(q, k, v, gamma, key_decay, numerators, normalizers, d_states, d_normalizers, d_out, d_den, rows, cols, weights)
