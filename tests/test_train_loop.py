"""The training loop: stop and resume reproduce an uninterrupted run exactly, the tiny config learns MQAR, the
command line parses, trains, resumes and plots, and bad configs fail with messages naming the key."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from twomamba_jax.train.cli import parse_train_args
from twomamba_jax.train.config import (CheckpointConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig,
                                       TrainConfig, load_config, override)
from twomamba_jax.train.trainer import masked_sums, setup, train


def _small(steps=8, **data):
    return TrainConfig(
        steps=steps, log_every=1,
        model=ModelConfig(size="tiny", mixer="2mamba", model_dim=64, num_layers=1, num_heads=2, head_dim=32,
                          mlp_dim=128),
        data=DataConfig(source="mqar", seq_len=32, batch_size=8, vocab_size=64, num_kv_pairs=4, **data),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=2),
        checkpoint=CheckpointConfig(every=3, keep=2),
        eval=EvalConfig(every=4, batches=1),
    )


def _records(workdir, split="train"):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if json.loads(line)["split"] == split]


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    config = _small()
    train(config, tmp_path / "straight")
    train(config, tmp_path / "stopped", stop_after=5)  # checkpoints at 3 and (on stopping) 5
    assert [r["step"] for r in _records(tmp_path / "stopped")] == [1, 2, 3, 4, 5]
    summary = train(config, tmp_path / "stopped")
    straight, resumed = _records(tmp_path / "straight"), _records(tmp_path / "stopped")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(straight, resumed):
        assert (a["loss"], a["grad_norm"], a["accuracy"]) == (b["loss"], b["grad_norm"], b["accuracy"]), a["step"]
    assert _records(tmp_path / "straight", "eval") == _records(tmp_path / "stopped", "eval")
    assert summary["step"] == 8 and json.loads((tmp_path / "stopped" / "summary.json").read_text())["step"] == 8
    assert (tmp_path / "stopped" / "tensorboard").is_dir()
    with pytest.raises(ValueError, match="data.batch_size: the checkpoint at step 8 was written with 8 rows per step"):
        train(override(override(config, "data.batch_size", "16"), "steps", "10"), tmp_path / "stopped")
    position = tmp_path / "stopped" / "checkpoints" / "8" / "data" / "metadata"
    position.write_text(json.dumps({**json.loads(position.read_text()), "processes": 2}))
    with pytest.raises(ValueError, match=r"step 8 was written by 2 process\(es\), each with its own data position"):
        train(override(config, "steps", "10"), tmp_path / "stopped")


def test_tiny_config_learns_mqar_in_a_shortened_run(tmp_path):
    """The tiny config's model and task, shorter rows and fewer steps: the loss must fall by at least 0.8 nats
    and recall beat chance (1/32 values) five-fold."""
    config = load_config("tiny")
    config = dataclasses.replace(config, steps=150, log_every=50,
                                 data=dataclasses.replace(config.data, seq_len=64, vocab_size=64, num_kv_pairs=8),
                                 eval=EvalConfig(every=150, batches=2))
    summary = train(config, tmp_path)
    losses = [r["loss"] for r in _records(tmp_path)]
    assert losses[0] - losses[-1] > 0.8, losses
    assert summary["eval"]["accuracy"] > 5 / 32, summary


def test_overrides_are_typed_and_checked():
    config = load_config("tiny")
    assert override(config, "model.mixer", "softmax").model.mixer == "softmax"
    assert override(config, "optim.learning_rate", "1e-4").optim.learning_rate == 1e-4
    assert override(config, "model.remat", "true").model.remat is True
    assert override(config, "model.chunk_size", "32").model.chunk_size == 32
    with pytest.raises(ValueError, match="--config.steps: expected a int; got 'many'"):
        override(config, "steps", "many")
    with pytest.raises(ValueError, match="unknown key 'mixr' in ModelConfig"):
        override(config, "model.mixr", "2mamba")
    with pytest.raises(ValueError, match="config: expected one of"):
        load_config("huge")
    config, workdir = parse_train_args(["--config", "small", "--config.model.mixer=softmax", "--workdir", "w"])
    assert (config.model.mixer, config.model.size, config.precision, workdir) == ("softmax", "small", "bfloat16", "w")
    assert load_config("medium").model.size == "medium"


@pytest.mark.parametrize("key,value,message", [
    ("data.seq_len", "0", "data.seq_len: expected a positive int; got 0"),
    ("data.source", "text:/nonexistent/*.txt", "matches no file"),
    ("data.source", "wikipedia", "data.source: expected"),
    ("model.mixer", "mamba3", "name: expected a mixer preset"),
    ("precision", "float8", "precision: expected one of"),
    ("log_every", "0", "log_every: expected a positive int; got 0"),
    ("eval.batches", "0", "eval: expected every >= 0"),
])
def test_bad_configs_fail_with_a_clear_message(tmp_path, key, value, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(override(_small(), key, value), tmp_path)


def test_text_sources_tokenizers_and_their_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="is empty"):
        train(override(override(_small(), "data.source", f"text:{empty}"), "data.seq_len", "16"), tmp_path / "a")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i}: " + "the quick brown fox " * (i % 5 + 1) for i in range(60)))
    with pytest.raises(ValueError, match="data.tokenizer: expected 'byte' or the path of a SentencePiece model"):
        train(override(override(_small(), "data.source", f"text:{corpus}"), "data.tokenizer", "gpt2"), tmp_path / "b")
    config = override(override(_small(steps=4), "data.source", f"text:{corpus}"), "data.seq_len", "16")
    summary = train(config, tmp_path / "text")
    assert summary["step"] == 4 and "accuracy" not in summary["eval"] and summary["eval"]["perplexity"] > 1


def test_packed_text_is_masked_per_document_unless_cross_document(tmp_path):
    """Text rows hold several documents: by default the train and eval steps give the model the rows' segment ids
    (the eval loss is the masked model's); ``data.cross_document=true`` lets documents see each other."""
    import jax
    import numpy as np
    from flax import nnx

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"doc {i}: " + "a b c " * (i % 4 + 1) for i in range(400)))
    config = override(override(_small(), "data.source", f"text:{corpus}"), "data.seq_len", "48")
    sums = {}
    for cross in ("false", "true"):
        run = setup(override(config, "data.cross_document", cross))
        params = run.init_state()["params"]
        batch = run.global_batch(run.dataset.eval_batches(1)[0])
        assert int(batch["segment_ids"].max()) > 1  # several documents a row
        sums[cross] = np.asarray(run.eval_step()(params, batch))
        with jax.set_mesh(run.mesh):
            model = nnx.merge(run.graphdef, params)
            ids = batch["segment_ids"] if cross == "false" else None
            expected = np.asarray(masked_sums(model(batch["inputs"], segment_ids=ids), batch))
        np.testing.assert_allclose(sums[cross], expected, rtol=3e-6)
    # At initialization the model is near uniform: the mask moves the loss sum by ~1e-4 of itself.
    assert abs(sums["false"][0] - sums["true"][0]) > 3e-5 * abs(sums["true"][0])


def test_command_line_stops_on_sigterm_resumes_and_plots(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "twomamba_jax.train", "--config", "tiny", "--workdir", str(tmp_path / "run"),
            "--config.log_every=1", "--config.optim.warmup_steps=2", "--config.data.seq_len=32",
            "--config.data.num_kv_pairs=4", "--config.eval.batches=1"]
    first = subprocess.Popen(base + ["--config.steps=400", "--config.eval.every=400"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in first.stdout:
        lines.append(line)
        if line.startswith("step 2/400"):
            first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
    output = "".join(lines)
    assert first.returncode == 0, first.stderr.read()
    assert "starting step 0/400" in output and "tok/s" in output and "ETA" in output
    stopped_at = int(re.search(r"stopped at step (\d+); rerun the same command to resume", output).group(1))
    assert 2 <= stopped_at < 400
    more = stopped_at + 3
    again = subprocess.run(base + [f"--config.steps={more}", f"--config.eval.every={more}"], capture_output=True,
                           text=True, env=env, check=True)
    assert f"resuming at step {stopped_at}/{more}" in again.stdout and f"done: step {more}/{more}" in again.stdout
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == list(range(1, more + 1))  # no step lost or repeated across the stop

    failed = subprocess.run(base + ["--config.steps=6", "--config.optim.warmup_steps=50"], capture_output=True,
                            text=True, env=env)
    assert failed.returncode == 2
    assert failed.stderr.strip().endswith("optim.warmup_steps: expected 0 to steps=6; got 50")
    helped = subprocess.run([sys.executable, "-m", "twomamba_jax.train", "--help"], capture_output=True, text=True,
                            env=env, check=True)
    assert "--config.model.mixer=2mamba" in helped.stdout and "--config.mesh.tensor=1" in helped.stdout
    plot = tmp_path / "curves.png"
    script = Path(sys.executable).parent / "twomamba-plot"  # the console script pip installs beside python
    subprocess.run([str(script), str(tmp_path / "run"), "-o", str(plot)], check=True, env=env, capture_output=True)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph {i}: the quick brown fox jumps over the lazy dog" for i in range(80)))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "spm"), vocab_size=48,
                                             minloglevel=2)
    config = override(override(_small(steps=2), "data.source", f"text:{corpus}"), "data.seq_len", "16")
    config = override(config, "data.tokenizer", str(tmp_path / "spm.model"))
    summary = train(config, tmp_path / "run")
    assert summary["step"] == 2 and summary["num_params"] > 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["tokenizer"].endswith("spm.model")


def test_tfds_dataset_is_prepared_as_array_record_and_trains_stops_and_resumes(tmp_path):
    """A real TFDS dataset (a builder of this test's own, prepared to ArrayRecord files in a temporary data dir,
    read with random access and no TensorFlow: the code path of tfds:c4/en): training on it stops and resumes
    exactly as an uninterrupted run (the data iterator's position is in the checkpoint), and a missing dataset or
    split fails with a clear message."""
    import tensorflow_datasets as tfds

    documents = [f"document {i}: " + "the quick brown fox " * (i % 5 + 1) for i in range(120)]

    class TinyTestText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(range(100)),
                    "validation": self._generate_examples(range(100, 120))}

        def _generate_examples(self, indices):
            for i in indices:
                yield i, {"text": documents[i]}

    config = override(override(override(_small(steps=6), "data.source", "tfds:tiny_test_text"), "data.seq_len", "16"),
                      "data.tfds_data_dir", str(tmp_path / "tfds"))
    train(config, tmp_path / "straight")
    assert sorted(p.name for p in (tmp_path / "tfds").glob("tiny_test_text/1.0.0/*.array_record*"))
    train(config, tmp_path / "stopped", stop_after=4)
    train(config, tmp_path / "stopped")
    straight, resumed = _records(tmp_path / "straight"), _records(tmp_path / "stopped")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [(r["loss"], r["grad_norm"]) for r in straight] == [(r["loss"], r["grad_norm"]) for r in resumed]
    with pytest.raises(ValueError, match="is not a TFDS dataset"):
        train(override(config, "data.source", "tfds:no_such_dataset_here"), tmp_path / "b")
    with pytest.raises(ValueError, match="data.eval_split: tiny_test_text has splits"):
        train(override(config, "data.eval_split", "test"), tmp_path / "c")