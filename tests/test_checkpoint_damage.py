"""Damaged checkpoints: when the newest checkpoint cannot be restored (an array file cut short or overwritten,
metadata missing, empty or garbled, an item missing) the run says so in one warning line naming the step and the
file, renames the checkpoint to ``<step>.damaged`` and resumes from the one before, computing exactly what a run
resumed from there computes. With every checkpoint damaged it stops with an error naming them; a checkpoint of
another batch size or model is not damage and is left in place.

One baseline run (checkpoints at steps 2 and 4) is shared by every case, which damages a copy of it; the
persistent compilation cache is on for this module, so that each resumed run reuses the compiled steps.
"""

import json
import shutil

import jax
import numpy as np
import pytest
from test_train_loop import _small

from twomamba_jax.train.cli import train_main
from twomamba_jax.train.config import override
from twomamba_jax.train.trainer import train

LOGGER = "twomamba_jax.train.checkpoint"


def _config(**overrides):
    config = override(override(_small(steps=6), "checkpoint.every", "2"), "checkpoint.async_save", "false")
    for key, value in overrides.items():
        config = override(config, key, value)
    return config


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Each run builds its jitted steps afresh; from the on-disk cache that costs ~2 s instead of ~7 s."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    previous = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    for name, value in previous.items():
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A run stopped after step 4 of 6: checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("baseline")
    train(_config(), workdir, stop_after=4)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    return workdir


def _outcome(workdir):
    """Every metrics line and the summary, without the timings."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((workdir / "summary.json").read_text())
    untimed = lambda record: {k: v for k, v in record.items() if k not in ("tokens_per_second", "seconds")}
    return [untimed(r) for r in records], {"step": summary["step"], "train": untimed(summary["train"]),
                                           "eval": summary["eval"]}


@pytest.fixture(scope="module")
def reference(baseline, tmp_path_factory):
    """What resuming from step 2 computes, undamaged: checkpoint 4 deleted, then run to the end. Steps 3 and 4
    recompute exactly what the baseline computed without stopping."""
    workdir = shutil.copytree(baseline, tmp_path_factory.mktemp("reference") / "run")
    shutil.rmtree(workdir / "checkpoints" / "4")
    summary = train(_config(), workdir)
    assert summary["step"] == 6
    records, summary = _outcome(workdir)
    assert [r for r in records if r["step"] <= 4] == _outcome(baseline)[0]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    return records, summary


def _chunk_file(step_dir):
    """The process's largest array data file (the b-tree refers to it; old node files are small)."""
    return max((step_dir / "state").glob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)


def _btree_file(step_dir):
    return next((step_dir / "state" / "d").iterdir())


def _truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _garble(path):
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _delete(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _empty(path):
    path.write_bytes(b"")


# (how, which file or directory of the step directory, what the warning must name)
DAMAGE = {
    "truncated array file": (_truncate, _chunk_file, None),
    "garbled array file": (_garble, _chunk_file, None),
    "garbled b-tree node": (_garble, _btree_file, None),
    "missing state metadata": (_delete, lambda d: d / "state" / "_METADATA", "state/_METADATA is missing"),
    "empty state metadata": (_empty, lambda d: d / "state" / "_METADATA", "state/_METADATA is empty"),
    "empty checkpoint metadata": (_empty, lambda d: d / "_CHECKPOINT_METADATA", "_CHECKPOINT_METADATA is empty"),
    "missing ocdbt manifest": (_delete, lambda d: d / "state" / "manifest.ocdbt", "state/manifest.ocdbt is missing"),
    "garbled data json": (_garble, lambda d: d / "data" / "metadata", "data/metadata is not valid JSON"),
    "missing data item": (_delete, lambda d: d / "data", "the data item (data/) is missing"),
    "garbled iterator state": (_garble, lambda d: d / "iterator" / "process_0-of-1.json",
                               "iterator/process_0-of-1.json is not valid JSON"),
    "missing state item": (_delete, lambda d: d / "state", "the state item (state/) is missing"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(
        kind, baseline, reference, tmp_path, caplog):
    how, which, named = DAMAGE[kind]
    workdir = shutil.copytree(baseline, tmp_path / "run")
    checkpoints = workdir / "checkpoints"
    target = which(checkpoints / "4")
    how(target)
    relative = target.relative_to(checkpoints / "4")
    damaged = target.read_bytes() if target.is_file() else None
    with caplog.at_level("WARNING", logger=LOGGER):
        summary = train(_config(), workdir)
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith("checkpoint 4 is damaged (") and (named or relative.as_posix()) in warnings[0]
    assert warnings[0].endswith(f"moved it to {checkpoints / '4.damaged'} and trying the checkpoint before it")
    moved = checkpoints / "4.damaged" / relative  # kept as it was found
    assert (checkpoints / "4.damaged").is_dir() and (moved.read_bytes() if moved.is_file() else None) == damaged
    assert summary["step"] == 6
    assert _outcome(workdir) == reference
    assert sorted(p.name for p in checkpoints.iterdir()) == ["4", "4.damaged", "6"]  # keep=2 dropped step 2


def test_every_checkpoint_damaged_stops_with_an_error_naming_them(baseline, tmp_path, caplog, capsys):
    workdir = shutil.copytree(baseline, tmp_path / "run")
    checkpoints = workdir / "checkpoints"
    _delete(checkpoints / "4" / "state" / "_METADATA")
    _truncate(_chunk_file(checkpoints / "2"))
    with caplog.at_level("WARNING", logger=LOGGER), pytest.raises(ValueError) as error:
        train(_config(), workdir)
    message = str(error.value)
    assert message.startswith(f"no checkpoint in {checkpoints} can be restored: every one is damaged"), message
    assert "4 (state/_METADATA is missing) -> 4.damaged" in message and "2 (state/ocdbt.process_0/d/" in message
    assert message.endswith("to start this run over from step 0, delete the *.damaged directories there or use a "
                            "new workdir")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2.damaged", "4.damaged"]
    assert [r.getMessage()[:25] for r in caplog.records if r.name == LOGGER] == ["checkpoint 4 is damaged (",
                                                                                 "checkpoint 2 is damaged ("]
    # Run again (here through the command line): it does not silently start over either; one line, exit code 2.
    capsys.readouterr()
    assert train_main(["--config", "tiny", "--workdir", str(workdir)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"twomamba-train: error: no checkpoint in {checkpoints} can be restored: the damaged ones were moved aside "
        "earlier (2.damaged, 4.damaged); to start this run over from step 0, delete them or use a new workdir")


@pytest.mark.parametrize("key,value,message", [
    ("data.batch_size", "16", "data.batch_size: the checkpoint at step 4 was written with 8 rows per step"),
    ("model.model_dim", "32", r"checkpoint 4 holds another model or optimizer than this config \(opt_state\..*: "
                              r"shape \(.*64.*\) in the checkpoint, \(.*32.*\) in this config\)"),
])
def test_a_config_mismatch_is_not_damage(baseline, tmp_path, key, value, message):
    workdir = shutil.copytree(baseline, tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        train(_config(**{key: value}), workdir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


def test_on_an_object_store_metrics_are_rewritten_and_a_damaged_checkpoint_is_copied_aside(
        baseline, reference, tmp_path, monkeypatch):
    """Where files cannot be appended to nor directories renamed (gs://), metrics.jsonl is written whole with each
    record and a damaged checkpoint is copied aside file by file: the same outcome as on a local disk. Exercised
    on a local directory treated as an object store."""
    from twomamba_jax.train import checkpoint, metrics

    monkeypatch.setattr(metrics, "is_remote", lambda location: True)
    monkeypatch.setattr(checkpoint, "is_remote", lambda location: True)
    workdir = shutil.copytree(baseline, tmp_path / "run")
    checkpoints = workdir / "checkpoints"
    files = sorted(p.relative_to(checkpoints / "4") for p in (checkpoints / "4").rglob("*") if p.is_file())
    _garble(checkpoints / "4" / "data" / "metadata")
    train(_config(), workdir)
    assert sorted(p.relative_to(checkpoints / "4.damaged") for p in (checkpoints / "4.damaged").rglob("*")
                  if p.is_file()) == files
    assert _outcome(workdir) == reference
