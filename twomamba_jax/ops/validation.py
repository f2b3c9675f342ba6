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
    """Shapes (B, N, H, dk) / (B, N, H, dk) / (B, N, H, dv) / (B, N, H); without the N axis for a single token."""
    lead = "(B, N, H" if token_axis else "(B, H"
    rank = 4 if token_axis else 3
    check_rank("q", q, rank, lead + ", dk)")
    check_rank("k", k, rank, lead + ", dk)")
    check_rank("v", v, rank, lead + ", dv)")
    if token_axis and q.shape[1] == 0:
        raise ValueError(f"q: expected at least one token (N >= 1); got shape {q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {lead}, dk) = {q.shape}; got {k.shape}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v: expected leading dims {lead}) = {q.shape[:-1]} matching q; got {v.shape}")
    if log_decay is not None:
        check_rank("log_decay", log_decay, rank - 1, lead + ")")
        if log_decay.shape != q.shape[:-1]:
            raise ValueError(f"log_decay: expected shape {lead}) = {q.shape[:-1]}; got {log_decay.shape}")
        check_non_positive("log_decay", log_decay)
