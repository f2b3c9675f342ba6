"""The state a sequence leaves behind, for decoding: a feature state (powers 1, 2) or a KV cache (exp).

Both are NamedTuples, hence pytrees: they pass through ``jax.jit``, ``lax.scan`` and sharding unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from twomamba_jax.ops.features import feature_size
from twomamba_jax.ops.validation import check_normalize, check_positive_int, check_power


class RecurrentState(NamedTuple):
    """Decayed sum of ``phi(k_j) v_j^T`` (and of ``phi(k_j)``) over the tokens seen so far.

    numerator:  (B, H, F, dv), F = feature_size(dk, power).
    normalizer: (B, H, F) for softmax normalization, None without it.
    Both float32 (float64 when the inputs are float64).
    """

    numerator: jax.Array
    normalizer: jax.Array | None


class KVCache(NamedTuple):
    """Keys and values of 2Mamba-E (power "exp"), which has no finite state.

    keys:             (B, L, H, dk), in the inputs' dtype; L is the capacity.
    values:           (B, L, H, dv).
    log_decay_cumsum: (B, L, H) float32 (float64 for float64 inputs), the cumulative log-decay at each token.
    log_decay_total:  (B, H), the cumulative log-decay after the last stored token.
    length:           () int32, how many of the L slots hold tokens.
    """

    keys: jax.Array
    values: jax.Array
    log_decay_cumsum: jax.Array
    log_decay_total: jax.Array
    length: jax.Array


AttentionState = RecurrentState | KVCache


def init_state(
    batch_size: int,
    num_heads: int,
    key_dim: int,
    value_dim: int,
    *,
    power: int | str,
    normalize: str | None,
    max_len: int | None = None,
    dtype=jnp.float32,
) -> AttentionState:
    """The empty state: zeros for powers 1 and 2, an empty KV cache of capacity ``max_len`` for "exp".

    ``dtype`` is the dtype of the inputs the state will meet: the KV cache stores keys and values in it;
    feature states and log-decays are float32, or float64 for float64 inputs.
    """
    state_dtype = jnp.result_type(jnp.float32, dtype)
    check_power(power)
    check_normalize(normalize)
    for name, value in (("batch_size", batch_size), ("num_heads", num_heads),
                        ("key_dim", key_dim), ("value_dim", value_dim)):
        check_positive_int(name, value)
    if power == "exp":
        if max_len is None:
            raise ValueError('max_len: power="exp" keeps a KV cache and needs its capacity; got None')
        check_positive_int("max_len", max_len)
        return KVCache(
            keys=jnp.zeros((batch_size, max_len, num_heads, key_dim), dtype),
            values=jnp.zeros((batch_size, max_len, num_heads, value_dim), dtype),
            log_decay_cumsum=jnp.zeros((batch_size, max_len, num_heads), state_dtype),
            log_decay_total=jnp.zeros((batch_size, num_heads), state_dtype),
            length=jnp.zeros((), jnp.int32),
        )
    features = feature_size(key_dim, power)
    return RecurrentState(
        numerator=jnp.zeros((batch_size, num_heads, features, value_dim), state_dtype),
        normalizer=jnp.zeros((batch_size, num_heads, features), state_dtype) if normalize else None,
    )


def check_state(state, *, batch_size, num_heads, key_dim, value_dim, power, normalize, name="initial_state") -> None:
    """The state must be of the kind and shapes ``init_state`` makes for these arguments."""
    if power == "exp":
        if not isinstance(state, KVCache):
            raise ValueError(f'{name}: power="exp" expects a KVCache (see init_state); got {type(state).__name__}')
        _, capacity, _, _ = state.keys.shape
        expected = {"keys": (batch_size, capacity, num_heads, key_dim),
                    "values": (batch_size, capacity, num_heads, value_dim),
                    "log_decay_cumsum": (batch_size, capacity, num_heads),
                    "log_decay_total": (batch_size, num_heads), "length": ()}
    else:
        if not isinstance(state, RecurrentState):
            raise ValueError(f"{name}: power={power} expects a RecurrentState (see init_state); "
                             f"got {type(state).__name__}")
        features = feature_size(key_dim, power)
        expected = {"numerator": (batch_size, num_heads, features, value_dim)}
        if normalize is None:
            if state.normalizer is not None:
                raise ValueError(f"{name}: normalize=None expects normalizer=None; got an array")
        else:
            if state.normalizer is None:
                raise ValueError(f"{name}: normalize={normalize!r} expects a normalizer array; got None")
            expected["normalizer"] = (batch_size, num_heads, features)
    for field, shape in expected.items():
        got = getattr(state, field).shape
        if got != shape:
            raise ValueError(f"{name}.{field}: expected shape {shape}; got {got}")
