"""The data pipeline: fixed-length token batches with loss masks and document boundaries, deterministic from a seed,
resumable at any step, and sharded per process.

A batch is a dict of (rows, seq_len) arrays: ``inputs`` and ``targets`` (int32, targets = inputs shifted by one),
``loss_mask`` (float32: 1 where the target counts) and ``segment_ids`` (int32: 1, 2, ... for the documents of a row,
0 for padding). Global step ``s`` is made of rows ``[s * B, (s + 1) * B)`` of the source; process ``p`` of ``P``
takes the ``p``-th slice of ``B / P`` of them, so the processes' rows are disjoint and together the whole batch.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from twomamba_jax.train import niah, synthetic, text
from twomamba_jax.train.tokenizers import make_tokenizer

Batch = dict[str, np.ndarray]


def pack_documents(documents: Iterable[np.ndarray], seq_len: int, eos_id: int) -> Iterator[tuple]:
    """Cuts the stream ``doc EOS doc EOS ...`` into rows of ``seq_len + 1`` tokens; every token lands in exactly one
    row. Yields (tokens (seq_len + 1,), valid (seq_len + 1,) bool, segments (seq_len + 1,) int32); the last row is
    padded with EOS, not valid. The EOS after each document is the boundary marker inside a row."""
    width = seq_len + 1
    flat, flat_segments = np.zeros(0, np.int32), np.zeros(0, np.int32)  # tokens not yet in a row
    for segment, doc in enumerate(documents, start=1):
        doc = np.append(np.asarray(doc, np.int32), eos_id)
        flat = np.concatenate([flat, doc])
        flat_segments = np.concatenate([flat_segments, np.full(doc.size, segment, np.int32)])
        full = flat.size // width * width  # every whole row at once: linear in the tokens, however long the doc
        for start in range(0, full, width):
            row_segments = flat_segments[start:start + width]
            yield flat[start:start + width], np.ones(width, bool), row_segments - row_segments[0] + 1
        flat, flat_segments = flat[full:], flat_segments[full:]
    if flat.size:
        pad = width - flat.size
        yield (np.concatenate([flat, np.full(pad, eos_id, np.int32)]),
               np.arange(width) < flat.size,
               np.concatenate([flat_segments - flat_segments[0] + 1, np.zeros(pad, np.int32)]))


def _batch(rows: list[tuple]) -> Batch:
    tokens = np.stack([r[0] for r in rows])
    valid = np.stack([r[1] for r in rows])
    segments = np.stack([r[2] for r in rows])
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                loss_mask=(valid[:, 1:] & valid[:, :-1]).astype(np.float32), segment_ids=segments[:, :-1])


class Dataset:
    """Batches for training and evaluation (see the module docstring); subclasses say where rows come from."""

    vocab_size: int
    has_accuracy: bool  # synthetic tasks: exact-match accuracy on the masked targets

    def __init__(self, *, seq_len: int, batch_size: int, share_index: int, share_count: int):
        if batch_size % share_count:
            raise ValueError(f"data.batch_size: {batch_size} is not divisible into the {share_count} shares of the "
                             "processes")
        self.seq_len, self.batch_size = seq_len, batch_size
        self.share_index, self.share_count = share_index, share_count
        self.local_batch_size = batch_size // share_count

    def _mine(self, position: int) -> bool:
        """Whether row ``position`` (0 to B - 1) of a global batch is in this process's share."""
        return position // self.local_batch_size == self.share_index

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        """This process's batches of global steps ``start_step, start_step + 1, ...`` (forever)."""
        raise NotImplementedError

    def eval_batches(self, num_batches: int) -> list[Batch]:
        """This process's eval batches: held-out rows, the same every time."""
        raise NotImplementedError


class SyntheticDataset(Dataset):
    """Rows of a synthetic task (``synthetic.TASKS``), random access: any step is made directly."""

    has_accuracy = True

    def __init__(self, task: str, *, seed: int, vocab_size: int, num_kv_pairs: int, **common):
        super().__init__(**common)
        synthetic.check_task(task, seq_len=self.seq_len, vocab_size=vocab_size, num_kv_pairs=num_kv_pairs)
        self.vocab_size = vocab_size
        self._make = functools.partial(synthetic.TASKS[task], seed, seq_len=self.seq_len, vocab_size=vocab_size,
                                       num_kv_pairs=num_kv_pairs)

    def _step(self, split: str, step: int) -> Batch:
        first = step * self.batch_size + self.share_index * self.local_batch_size
        rows = [self._make(split, i) for i in range(first, first + self.local_batch_size)]
        ones = np.ones(self.seq_len + 1, bool)
        batch = _batch([(tokens, ones, ones.astype(np.int32)) for tokens, _ in rows])
        batch["loss_mask"] = np.stack([mask for _, mask in rows])  # only the recall targets count
        return batch

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        return (self._step("train", step) for step in itertools.count(start_step))

    def eval_batches(self, num_batches: int) -> list[Batch]:
        return [self._step("eval", step) for step in range(num_batches)]


class TextDataset(Dataset):
    """Packed rows of tokenized documents, epoch after epoch (each epoch in its own seeded order)."""

    has_accuracy = False

    def __init__(self, train_documents: Callable, eval_documents: Callable, tokenizer, *, niah_fraction: float = 0.0,
                 seed: int = 0, **common):
        super().__init__(**common)
        self.tokenizer, self.vocab_size = tokenizer, tokenizer.vocab_size
        self._train_documents, self._eval_documents = train_documents, eval_documents
        if not 0.0 <= niah_fraction < 1.0:
            raise ValueError(f"data.niah_fraction: expected a fraction in [0, 1); got {niah_fraction}")
        if niah_fraction and self.seq_len + 1 < niah.min_length(tokenizer, with_answer=True):
            raise ValueError(f"data.niah_fraction: rows of data.seq_len={self.seq_len} tokens cannot hold a pass-key "
                             f"prompt and its answer ({niah.min_length(tokenizer, with_answer=True)} tokens)")
        self._niah_fraction, self._seed = niah_fraction, seed

    def _rows(self, documents: Iterable[str]) -> Iterator[tuple]:
        tokens = (self.tokenizer.encode(doc) for doc in documents)
        return pack_documents(tokens, self.seq_len, self.tokenizer.eos_id)

    def _train_rows(self) -> Iterator[tuple]:
        for epoch in itertools.count():
            empty = True
            for row in self._rows(self._train_documents(epoch)):
                empty = False
                yield row
            if empty:
                raise ValueError("data.source: the training data has no tokens")

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        # The stream is read from its start and the rows before start_step skipped: deterministic, O(position).
        mine = []
        for index, row in enumerate(self._train_rows()):
            step, position = divmod(index, self.batch_size)
            if step >= start_step and self._mine(position):
                mine.append(self._mixed(index, row))
            if position == self.batch_size - 1 and step >= start_step:
                yield _batch(mine)
                mine = []

    def _mixed(self, index: int, row: tuple) -> tuple:
        """Training row ``index``, or, with probability ``niah_fraction`` (drawn from the seed and the index, so a
        resumed run sees the same rows), a pass-key prompt built from the row's own text and ending with its
        answer (``niah.py``): one document, every token counted."""
        if not self._niah_fraction:
            return row
        rng = np.random.default_rng([self._seed, 2, index])
        if rng.random() >= self._niah_fraction:
            return row
        prompt = niah.build_prompt(row[0][row[1]], self.tokenizer, length=self.seq_len + 1, depth=rng.random(),
                                   seed=int(rng.integers(2**31)), with_answer=True)
        ones = np.ones(self.seq_len + 1, bool)
        return prompt.tokens, ones, ones.astype(np.int32)

    def eval_batches(self, num_batches: int) -> list[Batch]:
        """A held-out set with fewer rows than asked gives fewer batches (at least one)."""
        rows = list(itertools.islice(self._rows(self._eval_documents()), num_batches * self.batch_size))
        if len(rows) < self.batch_size:
            raise ValueError(f"data: the eval data has {len(rows)} rows of {self.seq_len + 1} tokens; one batch "
                             f"needs {self.batch_size} (lower data.batch_size or data.seq_len)")
        usable = len(rows) // self.batch_size
        return [_batch([row for position, row in enumerate(rows[s * self.batch_size:(s + 1) * self.batch_size])
                        if self._mine(position)]) for s in range(usable)]


def make_dataset(config, *, share_index: int = 0, share_count: int = 1) -> Dataset:
    """The ``Dataset`` of a ``DataConfig``, yielding share ``share_index`` of ``share_count`` equal shares of
    each global batch (a process's rows: ``sharding.process_batch_share``)."""
    for name in ("seq_len", "batch_size"):
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"data.{name}: expected a positive int; got {value!r}")
    common = dict(seq_len=config.seq_len, batch_size=config.batch_size, share_index=share_index,
                  share_count=share_count)
    source = config.source
    if source in synthetic.TASKS:
        if config.tokenizer != "byte":  # the tasks emit token ids directly; a tokenizer would go unused
            raise ValueError(f"data.tokenizer: {config.tokenizer!r} applies to text sources only; data.source="
                             f"{source!r} is a synthetic task (its vocabulary is data.vocab_size)")
        if config.niah_fraction:
            raise ValueError(f"data.niah_fraction: pass-key rows are made of text; data.source={source!r} is a "
                             "synthetic task (use data.source=needle for its own retrieval task)")
        return SyntheticDataset(source, seed=config.seed, vocab_size=config.vocab_size,
                                num_kv_pairs=config.num_kv_pairs, **common)
    return TextDataset(*text_documents(config), make_tokenizer(config.tokenizer), niah_fraction=config.niah_fraction,
                       seed=config.seed, **common)


def text_documents(config) -> tuple[Callable, Callable]:
    """(train documents per epoch, eval documents) of a text ``DataConfig.source`` (``text:`` or ``tfds:``)."""
    kind, _, name = config.source.partition(":")
    if kind == "text" and name:
        return text.text_files(name, seed=config.seed, eval_fraction=config.eval_fraction)
    if kind == "tfds" and name:
        return text.tfds_dataset(name, seed=config.seed, eval_split=config.eval_split)
    raise ValueError(f"data.source: expected {sorted(synthetic.TASKS)}, 'tfds:NAME' or 'text:PATH_OR_GLOB'; "
                     f"got {config.source!r}")
