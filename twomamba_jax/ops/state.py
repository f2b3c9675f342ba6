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

    keys:      (B, L, H, dk), in the inputs' dtype; L is the capacity.
    values:    (B, L, H, dv).
    log_decay: (B, L, H) float32 (float64 for float64 inputs): the log-decay from each stored token to the latest
               one (0 for the latest). Kept relative to the latest token, rebased at every write, so no long
               cumulative sum is ever differenced.
    length:    () int32, how many of the L slots hold tokens.
    """

    keys: jax.Array
    values: jax.Array
    log_decay: jax.Array
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
            log_decay=jnp.zeros((batch_size, max_len, num_heads), state_dtype),
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
                    "log_decay": (batch_size, capacity, num_heads), "length": ()}
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


def check_cache_room(name: str, capacity: int, length, new_tokens: int) -> None:
    """A cache must hold the new tokens. Checked when ``length`` is concrete; under jit see ``poison_overflow``."""
    if new_tokens > capacity:
        raise ValueError(f"{name}: the cache holds {capacity} tokens; got {new_tokens} new tokens")
    if not isinstance(length, jax.core.Tracer) and int(length) + new_tokens > capacity:
        raise ValueError(f"{name}: the cache holds {capacity} tokens and has {int(length)}; "
                         f"no room for {new_tokens} more")


def poison_overflow(y: jax.Array, capacity: int, length, new_tokens: int) -> jax.Array:
    """NaN outputs when the tokens did not fit (only possible under jit, where the length is traced): a cache
    write past its end would otherwise overwrite the last slots silently."""
    return jnp.where(length + new_tokens <= capacity, y, jnp.nan)


# Scores a cache attention materializes at once (B * H * query rows * keys; 512 MiB in float32): longer prompts are
# attended in blocks of query rows, so prefilling 8192 tokens of 40 prompts does not need the full (T, L) score tensor.
SCORE_BUDGET = 2**27


def map_query_blocks(attend, queries, *, keys: int, batch_heads: int):
    """``attend(queries)`` over blocks of query rows when all of them at once would pass ``SCORE_BUDGET`` scores.

    queries: a pytree whose leaves all have the query-token axis at axis 1 (e.g. (B, T, H, d), or (1, T) for
    per-token positions); ``attend`` maps such a pytree to one of (B, T, ...) outputs, each row depending only on
    its own query row; keys: the key slots each row scores; batch_heads: B * H. Blocks run one after another
    (``lax.map``); the last is padded and its extra rows dropped."""
    length = jax.tree.leaves(queries)[0].shape[1]
    rows = max(1, SCORE_BUDGET // max(1, keys * batch_heads))
    if rows >= length:
        return attend(queries)
    blocks = -(-length // rows)

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, blocks * rows - length)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(x.shape[0], blocks, rows, *x.shape[2:]), 1, 0)

    def join(y):
        y = jnp.moveaxis(y, 0, 1)
        return y.reshape(y.shape[0], blocks * rows, *y.shape[3:])[:, :length]

    return jax.tree.map(join, jax.lax.map(attend, jax.tree.map(split, queries)))


def write_tokens(buffer: jax.Array, tokens: jax.Array, start) -> jax.Array:
    """``buffer`` (B, L, ...) with ``tokens`` (B, T, ...) written at positions [start, start + T)."""
    zero = jnp.zeros((), jnp.asarray(start).dtype)
    index = (zero, jnp.asarray(start)) + (zero,) * (buffer.ndim - 2)
    return jax.lax.dynamic_update_slice(buffer, tokens.astype(buffer.dtype), index)
