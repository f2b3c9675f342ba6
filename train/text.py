"""Text documents for language modelling: named TFDS datasets (``tfds:NAME[/CONFIG]``) or local files
(``text:PATH_OR_GLOB``), as an iterator of strings per epoch, in a seeded order."""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

TEXT_FEATURE = "text"  # the feature holding the text in tfds' text datasets (tiny_shakespeare, lm1b, c4)


def _split_documents(text: str) -> list[str]:
    """Blank-line separated paragraphs of a file are its documents."""
    return [doc.strip() for doc in text.split("\n\n") if doc.strip()]


def text_files(pattern: str, *, seed: int, eval_fraction: float) -> tuple[Callable, Callable]:
    """(train documents per epoch, eval documents): the files matching ``pattern``, each cut into documents at
    blank lines; the last ``eval_fraction`` of them (at least one) are held out."""
    paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    if not paths or not all(Path(p).is_file() for p in paths):
        missing = [p for p in paths if not Path(p).is_file()] or [pattern]
        raise FileNotFoundError(f"data.source: text:{pattern} matches no file ({missing[0]!r} does not exist)")
    documents = []
    for path in paths:
        docs = _split_documents(Path(path).read_text(encoding="utf-8", errors="replace"))
        if not docs:
            raise ValueError(f"data.source: {path!r} is empty (no text to train on)")
        documents += docs
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction: expected a fraction in (0, 1); got {eval_fraction}")
    held_out = max(1, round(len(documents) * eval_fraction))
    if held_out >= len(documents):
        raise ValueError(f"data.source: text:{pattern} has {len(documents)} document(s) (blank-line separated); "
                         "need at least 2 to hold one out for eval")
    train, evaluation = documents[:-held_out], documents[-held_out:]

    def train_epoch(epoch: int) -> Iterator[str]:
        order = np.random.default_rng([seed, epoch]).permutation(len(train))
        return (train[i] for i in order)

    return train_epoch, lambda: iter(evaluation)


def tfds_dataset(name: str, *, seed: int, eval_split: str) -> tuple[Callable, Callable]:
    """(train documents per epoch, eval documents) of a TFDS text dataset, downloaded on first use."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(f'data.source: tfds:{name} needs tensorflow-datasets (and TensorFlow to prepare it): '
                          'pip install "twomamba_jax[tfds]"') from error
    try:
        builder = tfds.builder(name)
    except Exception as error:  # tfds raises its own DatasetNotFoundError with the list of close names
        raise ValueError(f"data.source: tfds:{name} is not a TFDS dataset ({error})") from error
    builder.download_and_prepare()
    if eval_split not in builder.info.splits:
        raise ValueError(f"data.eval_split: {name} has splits {sorted(builder.info.splits)}; got {eval_split!r}")

    def read(split: str, shuffle_seed: int | None):
        config = tfds.ReadConfig(shuffle_seed=shuffle_seed) if shuffle_seed is not None else None
        dataset = builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None, read_config=config)
        for example in tfds.as_numpy(dataset):
            yield example[TEXT_FEATURE].decode("utf-8", errors="replace")

    return (lambda epoch: read("train", seed + epoch)), (lambda: read(eval_split, None))
