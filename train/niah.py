"""Needle-in-a-haystack prompts, built offline from any text and a seed, and their exact-match scorer.

A prompt of ``length`` tokens is a window of haystack text (documents of a text source, tokenized and joined by
EOS) with the needle sentence ``The pass key is NNNNN. Remember it.`` inserted at a fraction ``depth`` of the
window (0: first, 1: just before the question), ending with the question ``What is the pass key? The pass key is``.
The model answers by greedy generation; the answer counts when its leading digits are exactly the key. Training
rows of the same form end with the answer (``data.niah_fraction``), so a model can learn the retrieval.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

NEEDLE = " The pass key is {key}. Remember it. "
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}."
KEY_DIGITS = 5


@dataclasses.dataclass
class Prompt:
    tokens: np.ndarray  # (length,) int32
    key: str  # the pass key's digits
    needle_start: int  # the needle's first token
    depth: float


def build_prompt(haystack: np.ndarray, tokenizer, *, length: int, depth: float, seed,
                 with_answer: bool = False) -> Prompt:
    """A prompt of exactly ``length`` tokens from the token stream ``haystack`` (a random window of it, repeated
    if it is shorter), the needle at ``round(depth * filler)`` tokens into the filler. The key is drawn from
    ``seed`` (an int or a tuple of ints) among the 5-digit numbers not in the window's text, so it occurs exactly
    once. ``with_answer``: the answer ``ANSWER`` ends the ``length`` tokens (a training row)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"--depths: expected fractions in [0, 1]; got {depth}")
    rng = np.random.default_rng(seed)
    question = tokenizer.encode(QUESTION)
    key = str(rng.integers(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))
    start_fraction = rng.random()
    while True:  # a key that the filler's text does not hold (the sizes may depend on the key's tokens)
        needle = tokenizer.encode(NEEDLE.format(key=key))
        answer = tokenizer.encode(ANSWER.format(key=key)) if with_answer else np.zeros(0, np.int32)
        room = length - len(needle) - len(question) - len(answer)
        if room < 0:
            raise ValueError(f"--lengths: {length} tokens cannot hold the needle and the question "
                             f"({length - room} tokens)")
        filler = np.tile(haystack, -(-room // max(len(haystack), 1))) if len(haystack) < room else haystack
        start = int(start_fraction * (len(filler) - room + 1))
        filler = np.asarray(filler[start:start + room], np.int32)
        if key not in tokenizer.decode(filler):
            break
        key = str(rng.integers(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))
    at = round(depth * room)
    tokens = np.concatenate([filler[:at], needle, filler[at:], question, answer]).astype(np.int32)
    return Prompt(tokens=tokens, key=key, needle_start=at, depth=depth)


def min_length(tokenizer, with_answer: bool = False) -> int:
    """The fewest tokens a prompt takes: the needle, the question (and the answer), no filler."""
    key = "0" * KEY_DIGITS
    pieces = [NEEDLE, QUESTION] + ([ANSWER] if with_answer else [])
    return sum(len(tokenizer.encode(piece.format(key=key))) for piece in pieces)


def is_correct(answer: str, key: str) -> bool:
    """Whether the generated ``answer`` states ``key``: its leading digits (after spaces) are exactly the key."""
    match = re.match(r"\s*(\d+)", answer)
    return match is not None and match.group(1) == key
