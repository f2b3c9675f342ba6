"""Evaluation of a trained run: ``ppl`` at the training length is the trainer's own eval loss on the same batches,
other lengths give their own rows; ``decode`` measures the decoding cache, whose bytes equal the analytic size for
every preset; results land as JSON and PNG in the work directory, and mistakes (an unknown task, a bad length, a
directory with no checkpoint) are one line each."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from twomamba_jax import nn, presets
from twomamba_jax.train import evaluate
from twomamba_jax.train.cli import eval_main


def test_ppl_at_the_training_length_is_the_trainers_eval_loss(text_run):
    workdir, summary = text_run
    lines = []
    path = evaluate.run(workdir, "ppl", lengths=[16, 32], progress=lines.append)
    result = json.loads(path.read_text())
    assert path == workdir / "eval_ppl.json" and result["step"] == 2 and result["train_length"] == 16
    at_16, at_32 = result["results"]
    assert (at_16["length"], at_32["length"]) == (16, 32)
    assert abs(at_16["loss"] - summary["eval"]["loss"]) <= 1e-5 * summary["eval"]["loss"]
    assert at_32["tokens"] > 0 and np.isfinite(at_32["loss"]) and at_32["loss"] != at_16["loss"]
    assert abs(at_16["perplexity"] - np.exp(at_16["loss"])) <= 1e-6 * at_16["perplexity"]
    assert path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert [line.split(":")[1].split("(")[0].strip() for line in lines[1:3]] == ["length 16", "length 32"]


def test_command_line_runs_and_names_its_mistakes(text_run, tmp_path, capsys):
    workdir = str(text_run[0])
    assert eval_main([workdir, "--task", "ppl"]) == 0
    assert "wrote" in capsys.readouterr().out
    shutil.copy(text_run[0] / "config.json", tmp_path / "config.json")  # a run that has not checkpointed yet
    for args, message in [
        ([workdir, "--task", "nope"], "--task: expected one of ppl, decode, niah, mqar; got 'nope'"),
        ([workdir, "--task", "ppl", "--lengths", "0,16"], "--lengths: expected positive integers; got [0, 16]"),
        ([workdir, "--task", "ppl", "--lengths", "16,x"], "--lengths: expected comma-separated integers; got '16,x'"),
        ([workdir, "--task", "ppl", "--batches", "0"], "--batches: expected a positive integer; got 0"),
        ([str(tmp_path), "--task", "ppl"], f"workdir: {str(tmp_path)!r} holds no checkpoint yet"),
    ]:
        assert eval_main(args) == 2, args
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith(f"twomamba-eval: error: {message}"), err


@pytest.mark.parametrize("mixer", sorted(presets.MIXER_PRESETS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_state_bytes_are_the_analytic_size(mixer, dtype):
    config = presets.model_config("tiny", mixer=mixer, vocab_size=40, model_dim=64, num_layers=2, num_heads=2,
                                  head_dim=32, mlp_dim=64, dtype=dtype)
    model = nnx.eval_shape(lambda: nn.LanguageModel(config, rngs=nnx.Rngs(0)))
    for batch, max_len in ((1, 16), (3, 40)):
        cache = jax.eval_shape(lambda: model.init_cache(batch, max_len=max_len))
        measured = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))
        assert measured == evaluate.decode_state_bytes(config, batch, max_len), (batch, max_len)


def test_decode_task_measures_a_constant_state_for_2mamba(text_run):
    workdir, _ = text_run
    path = evaluate.run(workdir, "decode", lengths=[8, 24], steps=3, progress=lambda line: None)
    rows = json.loads(path.read_text())["results"]
    assert [row["context"] for row in rows] == [8, 24]
    assert rows[0]["state_bytes"] == rows[1]["state_bytes"] == rows[0]["analytic_bytes"] > 0
    assert all(row["tokens_per_second"] > 0 for row in rows)
    assert path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_mqar_grid_agrees_with_the_eval_accuracy(text_run):
    from twomamba_jax.train.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
    from twomamba_jax.train.trainer import model_config
    from twomamba_jax.train.workdir import Trained, load

    config = TrainConfig(model=ModelConfig(size="tiny", mixer="2mamba", model_dim=32, num_layers=1, num_heads=2,
                                           head_dim=16, mlp_dim=64),
                         data=DataConfig(source="mqar", seq_len=32, batch_size=4, vocab_size=64, num_kv_pairs=4),
                         eval=EvalConfig(batches=1))
    trained = Trained(config, nn.LanguageModel(model_config(config, 64), rngs=nnx.Rngs(0)), 0, None)
    rows = evaluate.recall(trained, [32, 48], kv_pairs=[2, 4], batches=1, batch_size=4, progress=lambda line: None)
    assert [(row["length"], row["kv_pairs"]) for row in rows] == [(32, 2), (32, 4), (48, 2), (48, 4)]
    at_training = evaluate.perplexity(trained, [32], batches=1, batch_size=4, progress=lambda line: None)[0]
    assert rows[1]["accuracy"] == at_training["accuracy"] and rows[1]["loss"] == at_training["loss"]
    assert rows[1]["queries"] == 4 * ((32 + 1 - 2 * 4) // 2)  # every query of every row is scored
    with pytest.raises(ValueError, match="--kv-pairs: 40 pairs need 1 <= pairs < vocab_size / 2 = 32"):
        evaluate.recall(trained, [32], kv_pairs=[40], batches=1, batch_size=4)
    with pytest.raises(ValueError, match="--task mqar: needs a model trained on data.source='mqar'"):
        evaluate.recall(load(text_run[0]), [32], kv_pairs=[2], batches=1, batch_size=4)
