"""Needle-in-a-haystack: prompts hold the pass key exactly once, at the requested depth, at exactly the requested
length, reproducibly from the seed; the scorer is exact; the niah task runs a grid on a trained run."""

import json

import numpy as np
import pytest

from twomamba_jax.train import evaluate
from twomamba_jax.train.niah import NEEDLE, QUESTION, build_prompt, is_correct
from twomamba_jax.train.tokenizers import ByteTokenizer

TEXT = "\n".join(f"line {i}: the year 1{i:04d} saw rain, wind and sun over the hills." for i in range(60))


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("length", [80, 300, 2000])  # 2000: longer than the haystack, which repeats
def test_prompts_hold_the_key_once_at_the_depth(depth, length):
    tokenizer = ByteTokenizer()
    haystack = tokenizer.encode(TEXT[:1500])
    prompt = build_prompt(haystack, tokenizer, length=length, depth=depth, seed=(length, 7))
    text = tokenizer.decode(prompt.tokens)
    needle = NEEDLE.format(key=prompt.key)
    assert len(prompt.tokens) == length and text.endswith(QUESTION)
    assert text.count(prompt.key) == 1 and text.count(needle) == 1 and len(prompt.key) == 5
    room = length - len(needle) - len(QUESTION)  # bytes: one token per character here
    assert prompt.needle_start == round(depth * room)
    assert tokenizer.decode(prompt.tokens[prompt.needle_start:prompt.needle_start + len(needle)]) == needle
    again = build_prompt(haystack, tokenizer, length=length, depth=depth, seed=(length, 7))
    assert (again.tokens == prompt.tokens).all() and again.key == prompt.key


def test_prompt_mistakes_are_named():
    tokenizer = ByteTokenizer()
    with pytest.raises(ValueError, match="--lengths: 40 tokens cannot hold the needle and the question"):
        build_prompt(tokenizer.encode(TEXT), tokenizer, length=40, depth=0.5, seed=0)
    with pytest.raises(ValueError, match=r"--depths: expected fractions in \[0, 1\]; got 1.5"):
        build_prompt(tokenizer.encode(TEXT), tokenizer, length=200, depth=1.5, seed=0)


@pytest.mark.parametrize("answer,expected", [(" 48213.", True), ("48213", True), ("  48213 is it", True),
                                             ("482130", False), ("4821", False), ("x48213", False), ("", False),
                                             (" 48213\n48213", True), (" 4821 3", False)])
def test_the_scorer_is_exact(answer, expected):
    assert is_correct(answer, "48213") is expected


def test_niah_task_runs_a_grid_on_a_trained_run(text_run):
    workdir, _ = text_run
    path = evaluate.run(workdir, "niah", lengths=[96, 128], depths=[0.0, 1.0], trials=2, progress=lambda line: None)
    rows = json.loads(path.read_text())["results"]
    assert [(row["length"], row["depth"]) for row in rows] == [(96, 0.0), (96, 1.0), (128, 0.0), (128, 1.0)]
    for row in rows:
        assert len(row["answers"]) == 2
        assert row["accuracy"] == np.mean([is_correct(answer, key) for key, answer in row["answers"]])
    assert path.with_suffix(".png").stat().st_size > 0
