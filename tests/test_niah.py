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
    assert path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_training_rows_mix_in_pass_key_prompts_with_answers(tmp_path):
    import itertools
    import re

    from twomamba_jax.train.config import DataConfig
    from twomamba_jax.train.data import make_dataset
    from twomamba_jax.train.niah import ANSWER

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT.replace("\n", "\n\n"))
    config = DataConfig(source=f"text:{corpus}", seq_len=127, batch_size=8, niah_fraction=0.5)
    batches = make_dataset(config).train_iterator()
    mixed = list(itertools.islice(batches, 3))
    position = batches.get_state()  # after 3 steps
    mixed += list(itertools.islice(batches, 2))
    plain = list(itertools.islice(make_dataset(DataConfig(**{**vars(config), "niah_fraction": 0.0})).train_iterator(),
                                  5))
    tokenizer, prompts = ByteTokenizer(), 0
    for batch, reference in zip(mixed, plain):
        for row in range(8):
            text = tokenizer.decode(np.append(batch["inputs"][row], batch["targets"][row, -1]))
            if "The pass key is" not in text:  # a text row, untouched
                assert (batch["inputs"][row] == reference["inputs"][row]).all()
                continue
            prompts += 1
            key = re.search(r"The pass key is (\d+)\. Remember it\.", text).group(1)
            assert text.endswith(QUESTION + ANSWER.format(key=key)) and text.count(key) == 2  # the needle, the answer
            assert batch["loss_mask"][row].all() and (batch["segment_ids"][row] == 1).all()
    assert 10 <= prompts <= 30  # of 40 rows at 0.5
    resumed = make_dataset(config).train_iterator()
    resumed.set_state(position)
    resumed = next(resumed)
    assert all((resumed[name] == mixed[3][name]).all() for name in resumed)  # resuming sees the same rows
    for changes, message in [(dict(niah_fraction=1.0), r"data.niah_fraction: expected a fraction in \[0, 1\)"),
                             (dict(seq_len=40), "rows of data.seq_len=40 tokens cannot hold a pass-key prompt"),
                             (dict(source="mqar"), "data.niah_fraction: pass-key rows are made of text")]:
        with pytest.raises(ValueError, match=message):
            make_dataset(DataConfig(**{**vars(config), **changes}))
