"""The data pipeline: packing loses no token and marks every document boundary, each epoch is a new order of the
documents, batches are a pure function of the seed and step, resuming from a saved iterator state costs the same
at any step, and per-process shares are disjoint and cover the data."""

import itertools
import sys

import grain
import numpy as np
import pytest

from twomamba_jax.train import data, synthetic
from twomamba_jax.train.config import DataConfig
from twomamba_jax.train.data import make_dataset
from twomamba_jax.train.tokenizers import ByteTokenizer

EOS = ByteTokenizer().eos_id
DOCUMENTS = [(f"doc {i} " + "abc " * (i % 7 + 1)).strip() for i in range(80)]


def _text_config(tmp_path, **kw):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCUMENTS))
    return DataConfig(**{**dict(source=f"text:{corpus}", seq_len=24, batch_size=8, seed=3, eval_fraction=0.25), **kw})


def _stream(batches) -> np.ndarray:
    """The tokens of a process's rows in order (every row's inputs and its last target)."""
    return np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1).ravel() for b in batches])


def _documents(tokens) -> list[str]:
    """The whole documents of a token stream that starts at a document's start."""
    ends = np.flatnonzero(tokens == EOS)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [ByteTokenizer().decode(tokens[s:e]) for s, e in zip(starts, ends)]


@pytest.mark.parametrize("seq_len", [1, 7, 16, 100])
def test_packing_loses_no_token_and_each_epoch_is_a_new_order(tmp_path, seq_len):
    config = _text_config(tmp_path, seq_len=seq_len, batch_size=2)
    train = DOCUMENTS[:60]  # eval_fraction 0.25 holds out the last 20
    rows_for_two_epochs = 2 * sum(len(d) + 1 for d in train) // (2 * (seq_len + 1)) + 2
    batches = list(itertools.islice(make_dataset(config).train_iterator(), rows_for_two_epochs))
    documents = _documents(_stream(batches))
    first, second = documents[:60], documents[60:120]
    assert sorted(first) == sorted(train) and sorted(second) == sorted(train) and first != second
    for batch in batches:  # a new document starts exactly after each EOS
        for row, segments in zip(batch["inputs"], batch["segment_ids"]):
            assert segments[0] == 1 and np.all(batch["loss_mask"] == 1)
            np.testing.assert_array_equal(np.diff(segments), row[:-1] == EOS)


@pytest.mark.parametrize("source", ["mqar", "needle", "text"])
def test_same_seed_same_batches_and_resume_anywhere(tmp_path, source):
    config = _text_config(tmp_path) if source == "text" else DataConfig(source=source, seq_len=40, batch_size=8)
    batches = make_dataset(config).train_iterator()
    first = list(itertools.islice(batches, 5))
    position = batches.get_state()
    first += list(itertools.islice(batches, 7))  # text: past one epoch
    again = list(itertools.islice(make_dataset(config).train_iterator(), 12))
    resumed = make_dataset(config).train_iterator()
    resumed.set_state(position)
    for a, b in zip(first, again):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    for a, b in zip(first[5:], itertools.islice(resumed, 7)):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    other = next(make_dataset(DataConfig(**{**config.__dict__, "seed": 11})).train_iterator())
    assert not np.array_equal(other["inputs"], first[0]["inputs"])
    assert np.array_equal(first[0]["inputs"][:, 1:], first[0]["targets"][:, :-1])


def test_resuming_reads_the_same_few_documents_at_any_step(tmp_path, monkeypatch):
    """Restoring the data position of step k tokenizes O(1) documents, whatever k: the saved iterator state
    points into the shuffled stream; nothing before it is read again (counted with reading ahead turned off)."""
    monkeypatch.setattr(data, "READ_OPTIONS", grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    monkeypatch.setattr(data, "PREFETCH_BATCHES", 0)
    config = _text_config(tmp_path, seq_len=16, batch_size=4)
    encoded = []
    original = ByteTokenizer.encode
    monkeypatch.setattr(ByteTokenizer, "encode", lambda self, text: encoded.append(text) or original(self, text))
    costs = {}
    for step in (10, 1000):
        batches = make_dataset(config).train_iterator()
        for _ in range(step):
            next(batches)
        position, expected = batches.get_state(), next(batches)
        encoded.clear()
        resumed = make_dataset(config).train_iterator()
        resumed.set_state(position)
        got = next(resumed)
        costs[step] = len(encoded)
        assert all(np.array_equal(got[k], expected[k]) for k in got)
    assert max(costs.values()) <= 8, costs  # where reading from the start would tokenize ~4000 at step 1000


def test_process_shares_are_disjoint_and_cover_the_data(tmp_path):
    config = DataConfig(source="mqar", seq_len=40, batch_size=8)
    whole = list(itertools.islice(make_dataset(config).train_iterator(), 3))
    shards = [list(itertools.islice(make_dataset(config, share_index=p, share_count=4).train_iterator(), 3))
              for p in range(4)]
    for step, batch in enumerate(whole):  # synthetic rows: each process a slice of the one-process batch
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([shard[step][key] for shard in shards]), batch[key])
    config = _text_config(tmp_path, batch_size=4)  # text: each process reads every 4th document of an epoch
    epochs = [_documents(_stream(itertools.islice(make_dataset(config, share_index=p, share_count=4)
                                                  .train_iterator(), 40)))[:15] for p in range(4)]
    assert sorted(sum(epochs, [])) == sorted(DOCUMENTS[:60])
    evals = [make_dataset(config, share_index=p, share_count=4).eval_batches(1)[0] for p in range(4)]
    np.testing.assert_array_equal(np.concatenate([e["inputs"] for e in evals]),
                                  make_dataset(config).eval_batches(1)[0]["inputs"])
    with pytest.raises(ValueError, match="data.batch_size: 4 is not divisible into the 3 shares of the processes"):
        make_dataset(config, share_index=0, share_count=3)


def test_synthetic_tasks_mask_exactly_the_recall_targets():
    tokens, mask = synthetic.mqar_row(0, "train", 5, seq_len=40, vocab_size=64, num_kv_pairs=6)
    keys, values = tokens[:12:2], tokens[1:12:2]
    lookup = dict(zip(keys, values))
    inputs, targets = tokens[:-1], tokens[1:]
    asked = np.flatnonzero(mask)
    assert asked.size == (41 - 12) // 2 and np.all(asked >= 12)
    assert all(lookup[inputs[t]] == targets[t] for t in asked)
    tokens, mask = synthetic.needle_row(0, "train", 5, seq_len=40, vocab_size=64)
    where = np.flatnonzero(tokens == synthetic.NEEDLE)[0]
    assert mask.sum() == 1 and mask[-1] == 1 and tokens[-1] == tokens[where + 2] and tokens[-2] == tokens[where + 1]
    with pytest.raises(ValueError, match="data.num_kv_pairs: expected 1 to 31"):
        make_dataset(DataConfig(source="mqar", vocab_size=64, num_kv_pairs=40))


def test_byte_tokenizer_round_trips_unicode():
    tokenizer = ByteTokenizer()
    text = "naïve café — 2Mamba"
    ids = tokenizer.encode(text)
    assert ids.max() < 256 and tokenizer.decode(ids) == text and tokenizer.vocab_size == 257


def test_tfds_sources_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed: importing it fails
    with pytest.raises(ImportError, match=r'pip install "twomamba_jax\[tfds\]"'):
        make_dataset(DataConfig(source="tfds:tiny_shakespeare"))
