"""The data pipeline, on grain: fixed-length token batches with loss masks and document boundaries, deterministic
from a seed, sharded per process, and resumable in O(1) from the iterator state saved with every checkpoint.

A batch is a dict of (rows, seq_len) arrays: ``inputs`` and ``targets`` (int32, targets = inputs shifted by one),
``loss_mask`` (float32: 1 where the target counts) and ``segment_ids`` (int32: 1, 2, ... for the documents of a row,
0 for padding). ``Dataset.train_iterator()`` gives this process's batches of steps 0, 1, ...: a grain
``DatasetIterator``, whose ``get_state()`` / ``set_state()`` the checkpoints save and restore (so resuming at step
100k reads what resuming at step 10 does).

- Synthetic tasks: row ``r`` of the task is a pure function of (seed, split, r); global step ``s`` is made of rows
  ``[s * B, (s + 1) * B)`` and process ``p`` of ``P`` takes the ``p``-th slice of ``B / P`` of them, so the
  processes' rows are disjoint and together the batch of a one-process run.
- Text: the documents (a ``grain.MapDataset`` over a list of strings or a TFDS ArrayRecord source) are shuffled in
  a new seeded order each epoch, dealt round-robin to the processes (process ``p`` of ``P`` reads documents ``p, p +
  P, ...`` of that order), tokenized with an EOS after each, and packed by grain's ``ConcatThenSplitIterDataset``
  into rows of ``seq_len + 1`` tokens (``segment_ids`` from its segment ids: a document cut at a row's end goes on
  in the next row as that row's first segment). Each process packs and batches its own documents, so which rows a
  step holds depends on the process count; a checkpoint resumes with the process count it was written with.
- Eval batches (held-out rows, the same every time) are the first rows of the packed held-out documents, sliced
  per process like the synthetic rows, so every process count evaluates on the same rows.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence

import grain
import numpy as np

from twomamba_jax.train import niah, synthetic, text
from twomamba_jax.train.tokenizers import make_tokenizer

Batch = dict[str, np.ndarray]
PREFETCH_BATCHES = 2  # made by a background thread while the device trains
# Documents are read and tokenized ahead by a few threads (grain's default, 16 threads and 500 documents, is
# more than a packed row stream needs).
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=128)


def training_row(tokens: np.ndarray, segments: np.ndarray, loss_mask: np.ndarray | None = None) -> Batch:
    """One row of a batch from ``seq_len + 1`` tokens (``segments`` 0 on padding): the loss counts every target
    whose input and target are both tokens, unless ``loss_mask`` (seq_len,) says which."""
    valid = segments > 0
    if loss_mask is None:
        loss_mask = (valid[1:] & valid[:-1]).astype(np.float32)
    return dict(inputs=tokens[:-1].astype(np.int32), targets=tokens[1:].astype(np.int32),
                loss_mask=loss_mask.astype(np.float32), segment_ids=segments[:-1].astype(np.int32))


class Dataset:
    """Batches for training and evaluation (see the module docstring); subclasses say where rows come from."""

    vocab_size: int
    has_accuracy: bool  # synthetic tasks: exact-match accuracy on the masked targets
    packs_documents: bool  # rows hold several documents (text): the model can mask each to itself

    def __init__(self, *, seq_len: int, batch_size: int, share_index: int, share_count: int):
        if batch_size % share_count:
            raise ValueError(f"data.batch_size: {batch_size} is not divisible into the {share_count} shares of the "
                             "processes")
        self.seq_len, self.batch_size = seq_len, batch_size
        self.share_index, self.share_count = share_index, share_count
        self.local_batch_size = batch_size // share_count

    def train_iterator(self) -> grain.DatasetIterator:
        """This process's batches of steps 0, 1, ... (forever), with a checkpointable position."""
        batches = self._train_rows().batch(self.local_batch_size, drop_remainder=True, batch_fn=self._stack)
        if PREFETCH_BATCHES:
            batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=PREFETCH_BATCHES)
        return iter(batches)

    def _train_rows(self) -> grain.IterDataset:
        raise NotImplementedError

    def _stack(self, rows: Sequence[Batch]) -> Batch:
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    def eval_batches(self, num_batches: int) -> list[Batch]:
        """This process's eval batches: held-out rows, the same every time."""
        raise NotImplementedError

    def _my_share(self, rows: list[Batch]) -> Batch:
        """This process's rows of a global batch (a list of ``batch_size`` one-row batches)."""
        return self._stack(rows[self.share_index * self.local_batch_size:][:self.local_batch_size])


class SyntheticDataset(Dataset):
    """Rows of a synthetic task (``synthetic.TASKS``), random access: any row is made directly."""

    has_accuracy = True
    packs_documents = False

    def __init__(self, task: str, *, seed: int, vocab_size: int, num_kv_pairs: int, **common):
        super().__init__(**common)
        synthetic.check_task(task, seq_len=self.seq_len, vocab_size=vocab_size, num_kv_pairs=num_kv_pairs)
        self.vocab_size = vocab_size
        self._task, self._seed, self._num_kv_pairs = task, seed, num_kv_pairs

    def _row(self, split: str, index: int) -> Batch:
        tokens, mask = synthetic.TASKS[self._task](self._seed, split, index, seq_len=self.seq_len,
                                                    vocab_size=self.vocab_size, num_kv_pairs=self._num_kv_pairs)
        return training_row(tokens, np.ones(self.seq_len + 1, np.int32), mask)

    def _global_row(self, local: int) -> int:
        """The task row of this process's ``local``-th training row."""
        step, position = divmod(local, self.local_batch_size)
        return step * self.batch_size + self.share_index * self.local_batch_size + position

    def _train_rows(self) -> grain.IterDataset:
        rows = grain.MapDataset.range(sys.maxsize).map(lambda local: self._row("train", self._global_row(local)))
        return rows.to_iter_dataset(READ_OPTIONS)

    def eval_batches(self, num_batches: int) -> list[Batch]:
        return [self._my_share([self._row("eval", step * self.batch_size + i) for i in range(self.batch_size)])
                for step in range(num_batches)]


class TextDataset(Dataset):
    """Packed rows of tokenized documents, epoch after epoch (each epoch in its own seeded order)."""

    has_accuracy = False
    packs_documents = True

    def __init__(self, train_documents: Sequence[str], eval_documents: Sequence[str], tokenizer, *,
                 niah_fraction: float = 0.0, seed: int = 0, **common):
        super().__init__(**common)
        self.tokenizer, self.vocab_size = tokenizer, tokenizer.vocab_size
        if not len(train_documents):
            raise ValueError("data.source: the training data has no documents")
        self._train_documents, self._eval_documents = train_documents, eval_documents
        if not 0.0 <= niah_fraction < 1.0:
            raise ValueError(f"data.niah_fraction: expected a fraction in [0, 1); got {niah_fraction}")
        if niah_fraction and self.seq_len + 1 < niah.min_length(tokenizer, with_answer=True):
            raise ValueError(f"data.niah_fraction: rows of data.seq_len={self.seq_len} tokens cannot hold a pass-key "
                             f"prompt and its answer ({niah.min_length(tokenizer, with_answer=True)} tokens)")
        self._niah_fraction, self._seed = niah_fraction, seed

    def _packed(self, documents: grain.MapDataset) -> grain.IterDataset:
        """Rows of ``seq_len + 1`` tokens: {"tokens", "tokens_segment_ids", "tokens_positions"} (grain's packing;
        the segment ids are 0 on the padding of a last, partial row)."""
        eos = self.tokenizer.eos_id
        tokens = documents.map(lambda doc: {"tokens": np.append(self.tokenizer.encode(doc), eos).astype(np.int32)})
        return grain.experimental.ConcatThenSplitIterDataset(tokens.to_iter_dataset(READ_OPTIONS),
                                                             length_struct={"tokens": self.seq_len + 1})

    def _train_rows(self) -> grain.IterDataset:
        documents = grain.MapDataset.source(self._train_documents).shuffle(seed=self._seed).repeat()
        rows = self._packed(documents[self.share_index::self.share_count])
        if self._niah_fraction:
            rows = rows.random_map(self._mixed, seed=self._seed + 2)
        return rows.map(self._one_row)

    def _one_row(self, row: dict) -> Batch:
        return training_row(row["tokens"], row["tokens_segment_ids"])

    def _mixed(self, row: dict, rng: np.random.Generator) -> dict:
        """The row, or, with probability ``niah_fraction`` (drawn from the seed and the row's place in the stream,
        so a resumed run sees the same rows), a pass-key prompt built from the row's own text and ending with its
        answer (``niah.py``): one document, every token counted."""
        if rng.random() >= self._niah_fraction:
            return row
        tokens = row["tokens"][row["tokens_segment_ids"] > 0]
        prompt = niah.build_prompt(tokens, self.tokenizer, length=self.seq_len + 1, depth=rng.random(),
                                   seed=int(rng.integers(2**31)), with_answer=True)
        return {"tokens": prompt.tokens, "tokens_segment_ids": np.ones(self.seq_len + 1, np.int32)}

    def eval_batches(self, num_batches: int) -> list[Batch]:
        """A held-out set with fewer rows than asked gives fewer batches (at least one)."""
        packed = self._packed(grain.MapDataset.source(self._eval_documents))
        rows = [self._one_row(row) for row in itertools.islice(packed, num_batches * self.batch_size)]
        if len(rows) < self.batch_size:
            raise ValueError(f"data: the eval data has {len(rows)} rows of {self.seq_len + 1} tokens; one batch "
                             f"needs {self.batch_size} (lower data.batch_size or data.seq_len)")
        usable = len(rows) // self.batch_size
        return [self._my_share(rows[s * self.batch_size:(s + 1) * self.batch_size]) for s in range(usable)]


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


def text_documents(config) -> tuple[Sequence[str], Sequence[str]]:
    """(train documents, eval documents) of a text ``DataConfig.source`` (``text:`` or ``tfds:``)."""
    kind, _, name = config.source.partition(":")
    if kind == "text" and name:
        return text.text_files(name, eval_fraction=config.eval_fraction)
    if kind == "tfds" and name:
        return text.tfds_dataset(name, data_dir=config.tfds_data_dir or None, eval_split=config.eval_split)
    raise ValueError(f"data.source: expected {sorted(synthetic.TASKS)}, 'tfds:NAME' or 'text:PATH_OR_GLOB'; "
                     f"got {config.source!r}")
