"""Loss and accuracy curves of runs (their ``metrics.jsonl``) in one PNG."""

from __future__ import annotations

import io
import json
import os

from etils import epath

from twomamba_jax.train.workdir import path as workdir_path


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    path = workdir_path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"workdirs: {workdir} has no metrics.jsonl (not a twomamba-train work directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def plot_runs(workdirs: list[str], output: str | os.PathLike) -> epath.Path:
    """Train and eval loss of every run, and eval accuracy where the runs have it; returns the PNG's path."""
    from matplotlib.figure import Figure  # not pyplot: leaves the caller's backend (a notebook's) as it is

    runs = {str(workdir): read_metrics(workdir) for workdir in workdirs}
    has_accuracy = any("accuracy" in r for records in runs.values() for r in records if r["split"] == "eval")
    fig = Figure(figsize=(12 if has_accuracy else 7, 4.5))
    axes = fig.subplots(1, 2 if has_accuracy else 1, squeeze=False)
    loss_axis = axes[0, 0]
    for name, records in runs.items():
        for split, style in (("train", "-"), ("eval", "o--")):
            points = [(r["step"], r["loss"]) for r in records if r["split"] == split]
            if points:
                loss_axis.plot(*zip(*points), style, label=f"{name} {split}", markersize=3)
        if has_accuracy:
            points = [(r["step"], r["accuracy"]) for r in records if r["split"] == "eval" and "accuracy" in r]
            if points:
                axes[0, 1].plot(*zip(*points), "o-", label=name, markersize=3)
    loss_axis.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    loss_axis.legend(fontsize=8)
    if has_accuracy:
        axes[0, 1].set(xlabel="step", ylabel="exact-match accuracy", ylim=(0, 1.02), title="eval accuracy")
        axes[0, 1].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, output)


def save_figure(fig, output: str | os.PathLike) -> epath.Path:
    """``fig`` as a PNG at ``output`` (any epath location); returns its path."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    output = workdir_path(output)
    output.write_bytes(buffer.getvalue())
    return output
