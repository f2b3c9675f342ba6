"""Evaluation of a trained run (``twomamba-eval``): results as JSON and a PNG in the work directory.

Tasks:
- ``ppl``: loss and perplexity on the held-out rows of the run's own data source (``data.eval_split`` /
  ``data.eval_fraction``; the synthetic tasks' eval rows) at several context lengths, beyond the training length
  too, so length extrapolation shows as a curve. At the training length with the run's batch size and
  ``eval.batches`` it reads the batches the trainer evaluated on, so it gives the trainer's eval loss.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from twomamba_jax.train.data import make_dataset
from twomamba_jax.train.trainer import masked_sums
from twomamba_jax.train.workdir import Trained, load

TASKS = ("ppl",)


def perplexity(trained: Trained, lengths: list[int], *, batches: int, batch_size: int, progress=print) -> list[dict]:
    """One row per context length: {"length", "loss", "perplexity", "tokens"} (and "accuracy" for the synthetic
    tasks), over up to ``batches`` eval batches of ``batch_size`` rows."""
    graphdef, params = nnx.split(trained.model)
    sums = jax.jit(lambda params, batch: masked_sums(nnx.merge(graphdef, params)(batch["inputs"]), batch))
    rows = []
    for number, length in enumerate(lengths, start=1):
        started = time.perf_counter()
        data = dataclasses.replace(trained.config.data, seq_len=length, batch_size=batch_size)
        dataset = make_dataset(data)
        loss = count = correct = 0.0
        for batch in dataset.eval_batches(batches):
            batch_sums = jax.device_get(sums(params, batch))
            loss, count, correct = loss + float(batch_sums[0]), count + float(batch_sums[1]), correct + float(
                batch_sums[2])
        count = max(count, 1.0)
        row = {"length": length, "loss": loss / count, "perplexity": float(np.exp(min(loss / count, 50.0))),
               "tokens": int(count)}
        if dataset.has_accuracy:
            row["accuracy"] = correct / count
        rows.append(row)
        progress(f"ppl: length {length} ({number}/{len(lengths)}): loss {row['loss']:.4f}, perplexity "
                 f"{row['perplexity']:.3f} over {row['tokens']} tokens, {time.perf_counter() - started:.1f}s")
    return rows


def run(workdir: str | Path, task: str, *, lengths: list[int] | None = None, batches: int | None = None,
        batch_size: int | None = None, progress=print) -> Path:
    """Runs ``task`` on the newest checkpoint of ``workdir``; writes ``eval_TASK.json`` and ``eval_TASK.png``
    there and returns the JSON's path. Defaults: the training length, the run's batch size and eval batches."""
    if task not in TASKS:
        raise ValueError(f"--task: expected one of {', '.join(TASKS)}; got {task!r}")
    if lengths is not None and (not lengths or any(not isinstance(n, int) or n <= 0 for n in lengths)):
        raise ValueError(f"--lengths: expected positive integers; got {lengths}")
    for name, value in (("--batches", batches), ("--batch-size", batch_size)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name}: expected a positive integer; got {value!r}")
    trained = load(workdir)
    config = trained.config
    lengths = lengths or [config.data.seq_len]
    progress(f"{task}: step {trained.step} of {workdir} ({config.model.size} {config.model.mixer}, "
             f"{config.data.source}, trained at {config.data.seq_len} tokens)")
    rows = perplexity(trained, lengths, batches=batches or config.eval.batches,
                      batch_size=batch_size or config.data.batch_size, progress=progress)
    result = {"task": task, "step": trained.step, "mixer": config.model.mixer, "source": config.data.source,
              "train_length": config.data.seq_len, "results": rows}
    path = Path(workdir) / f"eval_{task}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, path.with_suffix(".png"))
    progress(f"wrote {path} and {path.with_suffix('.png').name}")
    return path


def _plot(result: dict, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    fig, axis = plt.subplots(figsize=(6.5, 4.2))
    axis.plot([r["length"] for r in rows], [r["loss"] for r in rows], "o-", label=result["mixer"])
    axis.axvline(result["train_length"], color="gray", linestyle=":", label="training length")
    axis.set(xscale="log", xlabel="context length (tokens)", ylabel="eval loss",
             title=f"{result['mixer']} at step {result['step']}: loss by context length")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
