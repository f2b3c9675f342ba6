"""Test setup: float64 is enabled so the dense reference can serve as an oracle, and the CPU shows 8 devices
(before JAX starts) so sharded training runs on meshes of up to 8."""

import io
import os
import zlib

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"])

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


def pytest_collection_modifyitems(items):
    """Tests marked ``slow`` first (in their order): started last, one would keep a worker busy after the others
    have finished."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def text_run(tmp_path_factory):
    """The work directory of a tiny 2mamba run trained for 2 steps on a small text file (byte tokens, 16-token
    rows), with its summary: for the tests that read a trained run back (generation, evaluation)."""
    from twomamba_jax.train.config import (CheckpointConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig,
                                           TrainConfig)
    from twomamba_jax.train.trainer import train

    root = tmp_path_factory.mktemp("text_run")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"note {i}: the quick brown fox jumps over the lazy dog" for i in range(40)))
    config = TrainConfig(
        steps=2, log_every=1,
        model=ModelConfig(size="tiny", mixer="2mamba", model_dim=32, num_layers=1, num_heads=2, head_dim=16,
                          mlp_dim=64),
        data=DataConfig(source=f"text:{corpus}", seq_len=16, batch_size=8, eval_fraction=0.25),
        optim=OptimConfig(warmup_steps=1), checkpoint=CheckpointConfig(every=2, keep=1),
        eval=EvalConfig(every=2, batches=2))
    summary = train(config, root / "run", stream=io.StringIO())
    return root / "run", summary
