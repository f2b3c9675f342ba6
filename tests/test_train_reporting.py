"""Trainer reporting: tokens/s and MFU count training time only (not compiling, evaluating or saving), MFU uses the
peak of the compute dtype, and a resumed run must keep the data it was trained on."""

import time
import types

import jax
import pytest

from twomamba_jax.train import metrics as metrics_module
from twomamba_jax.train import trainer as trainer_module
from twomamba_jax.train.config import (CheckpointConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig,
                                       TrainConfig, override)
from twomamba_jax.train.metrics import MetricsLogger, peak_flops
from twomamba_jax.train.trainer import train


def _small(steps=6):
    return TrainConfig(
        steps=steps, log_every=2,
        model=ModelConfig(size="tiny", mixer="2mamba", model_dim=32, num_layers=1, num_heads=2, head_dim=16,
                          mlp_dim=64),
        data=DataConfig(source="mqar", seq_len=32, batch_size=8, vocab_size=64, num_kv_pairs=4),
        optim=OptimConfig(warmup_steps=1), checkpoint=CheckpointConfig(every=3, keep=2),
        eval=EvalConfig(every=2, batches=1))


def test_rate_leaves_out_excluded_time(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: clock[0])
    logger = MetricsLogger(tmp_path, total_steps=100, start_step=0, tokens_per_step=1000, flops_per_token=1.0,
                           stream=open(tmp_path / "out.txt", "w"))
    clock[0] = 50.0  # compiling, before the clock starts
    logger.start_clock(0)
    clock[0] = 60.0
    assert logger.progress(10, {"loss": 1.0})["tokens_per_second"] == pytest.approx(1000.0)
    with logger.excluded():
        clock[0] = 160.0  # an evaluation
    clock[0] = 180.0
    assert logger.progress(30, {"loss": 1.0})["tokens_per_second"] == pytest.approx(1000.0)
    assert logger.excluded_seconds == pytest.approx(100.0)


def test_mfu_uses_the_peak_of_the_compute_dtype():
    h200, unknown = types.SimpleNamespace(device_kind="NVIDIA H200"), types.SimpleNamespace(device_kind="cpu")
    assert peak_flops(h200, "bfloat16") == 989e12 and peak_flops(h200, "float32") == 494e12
    assert peak_flops(unknown, "bfloat16") is None
    with jax.default_matmul_precision("highest"):  # true float32 matmuls: a peak the table does not hold
        assert peak_flops(h200, "float32") is None and peak_flops(h200, "bfloat16") == 989e12


def test_summary_leaves_out_compiling_and_evaluating(tmp_path, monkeypatch):
    slow_eval = trainer_module.evaluate

    def evaluate(*args):
        time.sleep(0.5)
        return slow_eval(*args)
    monkeypatch.setattr(trainer_module, "evaluate", evaluate)
    stream = open(tmp_path / "out.txt", "w")
    summary = train(_small(), tmp_path / "run", stream=stream)
    stream.close()
    assert summary["compile_seconds"] > 0
    # three evaluations (steps 2, 4, 6), half a second each, not in the training time
    assert summary["train_seconds"] < summary["seconds"] - summary["compile_seconds"] - 1.5
    assert summary["tokens_per_second"] == pytest.approx(6 * 8 * 32 / summary["train_seconds"])
    assert "compiled the train step in" in (tmp_path / "out.txt").read_text()


def test_resuming_with_other_data_is_refused_unless_allowed(tmp_path):
    config = _small()
    train(config, tmp_path / "run", stop_after=3)
    for key, value in (("data.seq_len", "48"), ("data.seed", "1"), ("data.source", "needle")):
        with pytest.raises(ValueError, match=f"{key}: the checkpoint at step 3 was trained with"):
            train(override(config, key, value), tmp_path / "run")
    assert train(override(config, "seed", "7"), tmp_path / "run")["step"] == 6  # the model's seed: no matter
    changed = override(override(config, "data.seq_len", "48"), "allow_data_change", "true")
    train(override(changed, "steps", "8"), tmp_path / "run")  # allowed; config.json now says 48
    assert train(override(changed, "steps", "9"), tmp_path / "run")["step"] == 9
