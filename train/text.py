"""Text documents for language modelling: named TFDS datasets (``tfds:NAME[/CONFIG]``, read as ArrayRecord with
random access) or local files (``text:PATH_OR_GLOB``), as random-access sequences of strings (train, eval)."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

TEXT_FEATURE = "text"  # the feature holding the text in tfds' text datasets (tiny_shakespeare, lm1b, c4)


def _split_documents(text: str) -> list[str]:
    """Blank-line separated paragraphs of a file are its documents."""
    return [doc.strip() for doc in text.split("\n\n") if doc.strip()]


def text_files(pattern: str, *, eval_fraction: float) -> tuple[list[str], list[str]]:
    """(train documents, eval documents): the files matching ``pattern``, each cut into documents at blank lines;
    the last ``eval_fraction`` of them (at least one) are held out."""
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
    return documents[:-held_out], documents[-held_out:]


class _TextOf(Sequence):
    """The text feature of a TFDS data source's examples, as strings, with random access."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        return self._source[index][TEXT_FEATURE].decode("utf-8", errors="replace")


def tfds_dataset(name: str, *, data_dir: str | None, eval_split: str) -> tuple[Sequence[str], Sequence[str]]:
    """(train documents, eval documents) of a TFDS text dataset in ArrayRecord files (random access, no
    TensorFlow needed to read them), prepared on first use under ``data_dir`` (TFDS's default when None): by
    process 0 only, the others wait for it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(f'data.source: tfds:{name} needs tensorflow-datasets: pip install "twomamba_jax[tfds]"') \
            from error
    import jax
    from jax.experimental import multihost_utils

    def make_builder():
        return tfds.builder(name, data_dir=data_dir, file_format="array_record")

    try:  # on every process: a wrong name stops them all, not only the one that prepares
        builder = make_builder()
    except Exception as error:  # tfds raises its own DatasetNotFoundError with the list of close names
        raise ValueError(f"data.source: tfds:{name} is not a TFDS dataset ({error})") from error
    if jax.process_index() == 0:
        builder.download_and_prepare()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"tfds:{name} prepared")
        builder = make_builder()  # reads what process 0 prepared
    splits = builder.info.splits
    for split, what in (("train", "data.source"), (eval_split, "data.eval_split")):
        if split not in splits:
            raise ValueError(f"{what}: {name} has splits {sorted(splits)}; got {split!r}")
    return _TextOf(builder.as_data_source(split="train")), _TextOf(builder.as_data_source(split=eval_split))
