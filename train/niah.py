"""Needle-in-a-haystack prompts, built offline from any text and a seed, and their exact-match scorer.

A prompt of ``length`` tokens is a window of haystack text (documents of a text source, tokenized and joined by
EOS) with the needle sentence ``The pass key is NNNNN. Remember it.`` inserted at a fraction ``depth`` of the
window (0: first, 1: just before the question), ending with the question ``What is the pass key? The pass key is``.
The model answers by greedy generation; the answer counts when its leading digits are exactly the key.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

NEEDLE = " The pass key is {key}. Remember it. "
QUESTION = " What is the pass key? The pass key is"
KEY_DIGITS = 5


@dataclasses.dataclass
class Prompt:
    tokens: np.ndarray  # (length,) int32
    key: str  # the pass key's digits
    needle_start: int  # the needle's first token
    depth: float


def build_prompt(haystack: np.ndarray, tokenizer, *, length: int, depth: float, seed) -> Prompt:
    """A prompt of exactly ``length`` tokens from the token stream ``haystack`` (a random window of it, repeated
    if it is shorter), the needle at ``round(depth * filler)`` tokens into the filler. The key is drawn from
    ``seed`` among the 5-digit numbers not in the window's text, so it occurs exactly once."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"--depths: expected fractions in [0, 1]; got {depth}")
    rng = np.random.default_rng(seed)
    question = tokenizer.encode(QUESTION)
    needle_size = len(tokenizer.encode(NEEDLE.format(key="0" * KEY_DIGITS)))
    room = length - needle_size - len(question)
    if room < 0:
        raise ValueError(f"--lengths: {length} tokens cannot hold the needle and the question "
                         f"({needle_size + len(question)} tokens)")
    if len(haystack) < room:
        haystack = np.tile(haystack, -(-room // max(len(haystack), 1)))
    start = int(rng.integers(0, len(haystack) - room + 1))
    filler = np.asarray(haystack[start:start + room], np.int32)
    seen = tokenizer.decode(filler)
    while (key := str(rng.integers(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))) in seen:
        pass
    needle = tokenizer.encode(NEEDLE.format(key=key))
    at = round(depth * room)
    tokens = np.concatenate([filler[:at], needle, filler[at:], question]).astype(np.int32)
    return Prompt(tokens=tokens, key=key, needle_start=at, depth=depth)


def is_correct(answer: str, key: str) -> bool:
    """Whether the generated ``answer`` states ``key``: its leading digits (after spaces) are exactly the key."""
    match = re.match(r"\s*(\d+)", answer)
    return match is not None and match.group(1) == key
