"""Argument checks at the public boundary: each failure is a ValueError naming the argument and the expectation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

POWERS = (1, 2, "exp")
NORMALIZATIONS = ("softmax", None)


def check_power(power) -> None:
    # `True == 1` in Python: reject bools explicitly.
    if isinstance(power, bool) or power not in POWERS:
        raise ValueError(f"power: expected one of {POWERS}; got {power!r}")


def check_normalize(normalize) -> None:
    if normalize not in NORMALIZATIONS:
        raise ValueError(
            f"normalize: expected 'softmax' or None (output normalization is the module's RMSNorm); got {normalize!r}"
        )


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}: expected a positive integer; got {value!r}")


def check_scale(scale) -> None:
    """A static positive number (Python or NumPy scalar), or None."""
    if scale is None:
        return
    is_number = isinstance(scale, (int, float, np.integer, np.floating)) and not isinstance(scale, (bool, np.bool_))
    if not (is_number and np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a positive finite number or None (meaning 1/sqrt(d)); got {scale!r}")


def check_floating(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating-point array; got dtype {x.dtype}")


def check_rank(name: str, x, rank: int, layout: str) -> None:
    if not hasattr(x, "shape") or x.ndim != rank:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{name}: expected shape {layout} (rank {rank}); got {shape}")
    check_floating(name, x)


def check_non_positive(name: str, x) -> None:
    """Log-decays must be <= 0 (decay factors <= 1). Checked when the values are concrete (outside jit)."""
    if isinstance(x, jax.core.Tracer):
        return
    values = np.asarray(x)
    if not bool(np.all((values <= 0) & np.isfinite(values))):  # NaN and -inf fail this too
        bad = values[~((values <= 0) & np.isfinite(values))][0]
        raise ValueError(f"{name}: expected finite values <= 0 (a log of a decay factor in (0, 1]); got {bad}")


def check_qkv(q, k, v, log_decay, *, token_axis: bool) -> None:
    """Shapes (B, N, H, dk) / (B, N, Hk, dk) / (B, N, Hk, dv) / (B, N, H), Hk dividing H (grouped keys and
    values); without the N axis for a single token. Every dimension must be at least 1."""
    lead = "(B, N, H" if token_axis else "(B, H"
    rank = 4 if token_axis else 3
    check_rank("q", q, rank, lead + ", dk)")
    check_rank("k", k, rank, lead[:-1] + "Hk, dk)")
    check_rank("v", v, rank, lead[:-1] + "Hk, dv)")
    # Empty inputs would be refused by some implementations and silently returned empty by others.
    what = ["a batch of at least one row (B >= 1)", "at least one token (N >= 1)", "at least one head (H >= 1)",
            "a head dim >= 1"]
    if not token_axis:
        del what[1]
    for name, x in (("q", q), ("k", k), ("v", v)):
        if 0 in x.shape:
            raise ValueError(f"{name}: expected {what[x.shape.index(0)]}; got shape {x.shape}")
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1] or heads % kv_heads:
        raise ValueError(f"k: expected the shape of q {q.shape} or the same with a head count dividing "
                         f"{heads} (grouped keys); got {k.shape}")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v: expected leading dims {k.shape[:-1]} matching k; got {v.shape}")
    if log_decay is not None:
        check_rank("log_decay", log_decay, rank - 1, lead + ")")
        if log_decay.shape != q.shape[:-1]:
            raise ValueError(f"log_decay: expected shape {lead}) = {q.shape[:-1]} (one per query head); got "
                             f"{log_decay.shape}")
        check_non_positive("log_decay", log_decay)


def check_non_negative_weights(q, k, *, power, normalize) -> None:
    """power 1 normalized divides by sum_j q_i . k_j exp(...), which can cross zero unless q, k >= 0 (the
    paper's layer applies a ReLU). Checked when the values are concrete; under jit the caller is trusted."""
    if power != 1 or normalize != "softmax" or isinstance(q, jax.core.Tracer) or isinstance(k, jax.core.Tracer):
        return
    for name, x in (("q", q), ("k", k)):
        if bool(np.any(np.asarray(x) < 0)):
            raise ValueError(f"{name}: power=1 with normalize='softmax' needs entries >= 0 (e.g. after a ReLU), "
                             "since the normalizer sum_j q_i.k_j can cross zero otherwise; got negative entries")


def check_segment_ids(segment_ids, batch: int, length: int) -> None:
    """segment_ids: a (B, N) integer array, one document id per token."""
    shape, dtype = getattr(segment_ids, "shape", None), getattr(segment_ids, "dtype", None)
    if shape != (batch, length) or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"segment_ids: expected a (B, N) = {(batch, length)} integer array (one document id per "
                         f"token); got {type(segment_ids).__name__} of shape {shape} and dtype {dtype}")
