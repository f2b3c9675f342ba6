"""The data pipeline: packing loses no token and marks every document boundary, batches are a pure function of
the seed and step, and per-process shards are disjoint and cover the global batch."""

import itertools

import numpy as np
import pytest

from twomamba_jax.train import synthetic
from twomamba_jax.train.config import DataConfig
from twomamba_jax.train.data import make_dataset, pack_documents
from twomamba_jax.train.tokenizers import ByteTokenizer

EOS = 999


@pytest.mark.parametrize("seq_len", [1, 7, 16, 100])
def test_packing_loses_no_token_and_marks_boundaries(rng, seq_len):
    documents = [rng.integers(0, 50, rng.integers(1, 40)) for _ in range(30)]
    rows = list(pack_documents(documents, seq_len, EOS))
    assert all(tokens.size == seq_len + 1 for tokens, _, _ in rows)
    kept = np.concatenate([tokens[valid] for tokens, valid, _ in rows])
    np.testing.assert_array_equal(kept, np.concatenate([np.append(d, EOS) for d in documents]))
    for tokens, valid, segments in rows:
        assert np.all(np.diff(valid.astype(int)) <= 0)  # padding only at the end
        changes = np.flatnonzero(np.diff(segments[valid]) != 0)
        assert np.all(tokens[changes] == EOS)  # a new document starts only right after an EOS
        assert np.all(segments[~valid] == 0) and np.all(segments[valid] >= 1)


def _text_config(tmp_path, **kw):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"doc {i} " + "abc " * (i % 7 + 1) for i in range(80)))
    return DataConfig(source=f"text:{corpus}", seq_len=24, batch_size=8, seed=3, eval_fraction=0.25, **kw)


@pytest.mark.parametrize("source", ["mqar", "needle", "text"])
def test_same_seed_same_batches_and_resume_anywhere(tmp_path, source):
    config = _text_config(tmp_path) if source == "text" else DataConfig(source=source, seq_len=40, batch_size=8)
    first = list(itertools.islice(make_dataset(config).batches(0), 12))  # text: past one epoch
    again = list(itertools.islice(make_dataset(config).batches(0), 12))
    resumed = list(itertools.islice(make_dataset(config).batches(5), 7))
    for a, b in zip(first, again):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    for a, b in zip(first[5:], resumed):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    other = next(make_dataset(DataConfig(**{**config.__dict__, "seed": 11})).batches(0))
    assert not np.array_equal(other["inputs"], first[0]["inputs"])
    assert np.array_equal(first[0]["inputs"][:, 1:], first[0]["targets"][:, :-1])


@pytest.mark.parametrize("source", ["mqar", "text"])
def test_process_shards_are_disjoint_and_cover_the_batch(tmp_path, source):
    config = _text_config(tmp_path) if source == "text" else DataConfig(source=source, seq_len=40, batch_size=8)
    whole = list(itertools.islice(make_dataset(config).batches(2), 3))
    shards = [list(itertools.islice(make_dataset(config, share_index=p, share_count=4).batches(2), 3))
              for p in range(4)]
    for step, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([shard[step][key] for shard in shards]), batch[key])
    evals = [make_dataset(config, share_index=p, share_count=4).eval_batches(1)[0] for p in range(4)]
    np.testing.assert_array_equal(np.concatenate([e["inputs"] for e in evals]),
                                  make_dataset(config).eval_batches(1)[0]["inputs"])
    with pytest.raises(ValueError, match="data.batch_size: 8 is not divisible into the 3 shares of the processes"):
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


def test_tfds_sources_say_what_to_install(tmp_path):
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r'pip install "twomamba_jax\[tfds\]"'):
            make_dataset(DataConfig(source="tfds:tiny_shakespeare"))
    else:
        with pytest.raises(ValueError, match="is not a TFDS dataset"):
            make_dataset(DataConfig(source="tfds:no_such_dataset_here"))
