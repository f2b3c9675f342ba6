"""Synthetic recall tasks generated from a seed: multi-query associative recall (MQAR, as in the Zoology benchmark)
and needle-in-a-haystack retrieval. Every row is a pure function of (seed, split, row index), so any batch can be
regenerated and a run resumes anywhere.

A row is ``seq_len + 1`` tokens: inputs are ``row[:-1]``, targets ``row[1:]``; the loss mask selects the targets
that can be answered only by recall (a value after its key's query), and exact-match accuracy is measured there.
"""

from __future__ import annotations

import numpy as np

SPLITS = {"train": 0, "eval": 1}


def _rng(seed: int, split: str, row: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], row])


def mqar_row(seed: int, split: str, row: int, *, seq_len: int, vocab_size: int, num_kv_pairs: int):
    """``k1 v1 ... kn vn`` then query pairs ``k v`` (keys drawn again at random); loss on the queried values.

    Keys come from [1, V/2), values from [V/2, V). Returns (tokens (seq_len + 1,), mask (seq_len,)) where
    mask[t] = 1 when targets[t] = tokens[t + 1] is a queried value.
    """
    rng = _rng(seed, split, row)
    half = vocab_size // 2
    keys = rng.choice(np.arange(1, half), num_kv_pairs, replace=False)
    values = rng.integers(half, vocab_size, num_kv_pairs)
    num_queries = (seq_len + 1 - 2 * num_kv_pairs) // 2
    asked = rng.integers(0, num_kv_pairs, num_queries)
    tokens = np.zeros(seq_len + 1, np.int32)  # 0 pads an odd tail
    tokens[: 2 * num_kv_pairs : 2], tokens[1 : 2 * num_kv_pairs : 2] = keys, values
    start = 2 * num_kv_pairs
    tokens[start : start + 2 * num_queries : 2] = keys[asked]
    tokens[start + 1 : start + 2 * num_queries : 2] = values[asked]
    mask = np.zeros(seq_len, np.float32)
    mask[start : start + 2 * num_queries : 2] = 1.0  # input = a queried key, target = its value
    return tokens, mask


NEEDLE, QUERY = 1, 2  # marker tokens


def needle_row(seed: int, split: str, row: int, *, seq_len: int, vocab_size: int, **unused):
    """Filler tokens from [3, V/2) with ``NEEDLE k v`` at a random place and ``QUERY k v`` at the end; the loss
    is on that last v. Keys come from [V/2, 3V/4), values from [3V/4, V)."""
    del unused
    rng = _rng(seed, split, row)
    half, three_quarters = vocab_size // 2, 3 * vocab_size // 4
    tokens = rng.integers(3, half, seq_len + 1).astype(np.int32)
    key, value = rng.integers(half, three_quarters), rng.integers(three_quarters, vocab_size)
    where = rng.integers(0, seq_len + 1 - 6)
    tokens[where : where + 3] = NEEDLE, key, value
    tokens[-3:] = QUERY, key, value
    mask = np.zeros(seq_len, np.float32)
    mask[-1] = 1.0  # input = the queried key, target = its value
    return tokens, mask


TASKS = {"mqar": mqar_row, "needle": needle_row}


def check_task(name: str, *, seq_len: int, vocab_size: int, num_kv_pairs: int) -> None:
    if vocab_size < 16:
        raise ValueError(f"data.vocab_size: the synthetic tasks need at least 16 token ids; got {vocab_size}")
    if name == "mqar":
        if not 1 <= num_kv_pairs < vocab_size // 2:
            raise ValueError(f"data.num_kv_pairs: expected 1 to {vocab_size // 2 - 1} (distinct keys below "
                             f"vocab_size / 2); got {num_kv_pairs}")
        if seq_len + 1 < 2 * num_kv_pairs + 2:
            raise ValueError(f"data.seq_len: mqar with {num_kv_pairs} pairs needs at least "
                             f"{2 * num_kv_pairs + 1} tokens (the pairs and one query); got {seq_len}")
    elif seq_len < 8:
        raise ValueError(f"data.seq_len: needle needs at least 8 tokens; got {seq_len}")
