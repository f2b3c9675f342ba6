"""Pallas kernels of the chunked algorithm, written for the Triton lowering (GPU); they run in interpret mode on CPU.

Two launches, as the chunked form splits (SPEC section 2):

1. ``chunk_states``: grid (B*H, feature blocks). Each program walks the chunks in order, carrying its block of the
   state ``S`` (BF x dv) and normalizer ``z`` (BF) in registers, and writes the state *before* every chunk.
2. ``chunk_outputs``: grid (B*H, chunks), fully parallel. Each program computes its chunk's masked quadratic part
   and adds ``exp(gamma_i) phi(q_i)^T S_{c-1}``, looping over the feature blocks of the stored state.

phi tiles are built on chip from q and k (see ``features.py``) and never written out. Decays, cumulative sums,
states and accumulators are float32; matmul operands are the inputs' dtype (float32 dots use IEEE precision,
not TF32). Triton wants power-of-two blocks and no slicing of values, so everything is sliced from refs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from twomamba_jax.ops.numerics import NORMALIZER_EPS


def _dot(a, b, trans_b=False):
    """a @ b (or a @ b^T) with float32 accumulation; float32 operands at full precision."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    contract = (((1,), (1,)) if trans_b else ((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, contract, precision=precision, preferred_element_type=jnp.float32)


def _features(x, rows, cols, weights, power):
    """phi(x) for one feature block: (C, d) -> (C, BF) float32."""
    if power == 1:
        return x.astype(jnp.float32)
    return _dot(x, rows) * _dot(x, cols) * weights


def _compiler_params(num_warps, num_stages):
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def chunk_states(k, v, key_decay, chunk_decay, rows, cols, weights, numerator0, normalizer0, *, power,
                 chunk_size, feature_block, interpret=False, num_warps=4, num_stages=2):
    """States before every chunk, and after the last.

    k: (BH, Np, dk); v: (BH, Np, dv); key_decay: (BH, Np) float32 ``exp(gamma_last - gamma_j)``;
    chunk_decay: (BH, nc) float32 ``exp(gamma_last)``; rows, cols: (dk, F); weights: (1, F);
    numerator0: (BH, F, dv) float32; normalizer0: (BH, F) float32.
    Returns (numerators (BH, nc, F, dv), normalizers (BH, nc, F), final numerator, final normalizer), float32.
    """
    bh, padded_len, _ = k.shape
    dv = v.shape[-1]
    features = numerator0.shape[1]
    num_chunks = padded_len // chunk_size
    block = feature_block

    def kernel(k_ref, v_ref, kd_ref, cd_ref, rows_ref, cols_ref, w_ref, s0_ref, z0_ref,
               s_ref, z_ref, sf_ref, zf_ref):
        head, fblock = pl.program_id(0), pl.program_id(1)
        fs = pl.ds(fblock * block, block)
        rows_b, cols_b, w_b = rows_ref[:, fs], cols_ref[:, fs], w_ref[:, fs]

        def step(c, carry):
            state, norm = carry
            s_ref[head, c, fs, :] = state
            z_ref[head, c, fs] = norm
            ts = pl.ds(c * chunk_size, chunk_size)
            phi = _features(k_ref[head, ts, :], rows_b, cols_b, w_b, power) * kd_ref[head, ts][:, None]
            decay = cd_ref[head, c]
            v_c = v_ref[head, ts, :]
            state = decay * state + _dot(phi.T.astype(v_c.dtype), v_c)
            norm = decay * norm + jnp.sum(phi, axis=0)
            return state, norm

        state, norm = jax.lax.fori_loop(0, num_chunks, step, (s0_ref[head, fs, :], z0_ref[head, fs]))
        sf_ref[head, fs, :] = state
        zf_ref[head, fs] = norm

    f32 = jnp.float32
    out_shape = (
        jax.ShapeDtypeStruct((bh, num_chunks, features, dv), f32),
        jax.ShapeDtypeStruct((bh, num_chunks, features), f32),
        jax.ShapeDtypeStruct((bh, features, dv), f32),
        jax.ShapeDtypeStruct((bh, features), f32),
    )
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(bh, features // block), interpret=interpret,
        compiler_params=_compiler_params(num_warps, num_stages), name="twomamba_chunk_states",
    )(k, v, key_decay, chunk_decay, rows, cols, weights, numerator0, normalizer0)


def chunk_outputs(q, k, v, gamma, numerators, normalizers, rows, cols, weights, *, power, normalize,
                  chunk_size, feature_block, interpret=False, num_warps=4, num_stages=2):
    """Outputs of every chunk. q (pre-scaled), k: (BH, Np, dk); v: (BH, Np, dv); gamma: (BH, Np) float32 chunk-local
    cumulative log-decay; numerators, normalizers: from ``chunk_states``. Returns y: (BH, Np, dv) in v's dtype."""
    bh, padded_len, _ = q.shape
    dv = v.shape[-1]
    features = numerators.shape[2]
    num_chunks = padded_len // chunk_size
    block = feature_block

    def kernel(q_ref, k_ref, v_ref, g_ref, s_ref, z_ref, rows_ref, cols_ref, w_ref, y_ref):
        head, c = pl.program_id(0), pl.program_id(1)
        ts = pl.ds(c * chunk_size, chunk_size)
        q_c, v_c = q_ref[head, ts, :], v_ref[head, ts, :]
        g = g_ref[head, ts]
        scores = _dot(q_c, k_ref[head, ts, :], trans_b=True)
        scores = scores if power == 1 else scores * scores
        row = jax.lax.broadcasted_iota(jnp.int32, (chunk_size, chunk_size), 0)
        col = jax.lax.broadcasted_iota(jnp.int32, (chunk_size, chunk_size), 1)
        # Mask before the exp: above the diagonal g_i - g_j >= 0 could overflow.
        weights_ij = scores * jnp.exp(jnp.where(row >= col, g[:, None] - g[None, :], -jnp.inf))
        numerator = _dot(weights_ij.astype(v_c.dtype), v_c)
        denominator = jnp.sum(weights_ij, axis=1)
        inflow = jnp.exp(g)[:, None]

        def add_block(fblock, carry):
            numerator, denominator = carry
            fs = pl.ds(fblock * block, block)
            phi = _features(q_c, rows_ref[:, fs], cols_ref[:, fs], w_ref[:, fs], power) * inflow
            numerator = numerator + _dot(phi.astype(v_c.dtype), s_ref[head, c, fs, :].astype(v_c.dtype))
            denominator = denominator + jnp.sum(phi * z_ref[head, c, fs][None, :], axis=1)
            return numerator, denominator

        numerator, denominator = jax.lax.fori_loop(0, features // block, add_block, (numerator, denominator))
        if normalize:
            numerator = numerator / jnp.maximum(denominator, NORMALIZER_EPS)[:, None]
        y_ref[head, ts, :] = numerator.astype(y_ref.dtype)

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((bh, padded_len, dv), v.dtype), grid=(bh, num_chunks),
        interpret=interpret, compiler_params=_compiler_params(num_warps, num_stages), name="twomamba_chunk_outputs",
    )(q, k, v, gamma, numerators, normalizers, rows, cols, weights)

