"""Evaluation of a trained run (``twomamba-eval``): results as JSON and a PNG in the work directory.

Tasks:
- ``ppl``: loss and perplexity on the held-out rows of the run's own data source (``data.eval_split`` /
  ``data.eval_fraction``; the synthetic tasks' eval rows) at several context lengths, beyond the training length
  too, so length extrapolation shows as a curve. At the training length with the run's batch size and
  ``eval.batches`` it reads the batches the trainer evaluated on, so it gives the trainer's eval loss.
- ``decode``: after a prompt of each context length, the decoding cache's bytes (measured, and the analytic size
  from the config alone, ``decode_state_bytes``) and the decode speed in tokens/s on the device in use: a
  constant-size state for powers 1 and 2 and Mamba-2 against a KV cache that grows with the context for softmax
  and 2Mamba-E (the paper's figure 7).
- ``niah``: needle-in-a-haystack pass-key retrieval (``niah.py``) over a grid of context lengths x needle depths,
  ``trials`` prompts per cell from the held-out documents of the run's text source, answered greedily; exact-match
  accuracy per cell, plotted as a heatmap.
- ``mqar``: exact-match recall of a model trained on MQAR over a grid of lengths x key-value pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import numpy as np
from etils import epath
from flax import nnx

from twomamba_jax import nn
from twomamba_jax.generate import compiled_steps, generate
from twomamba_jax.ops.features import feature_size
from twomamba_jax.train.data import make_dataset, text_documents
from twomamba_jax.train.niah import build_prompt, is_correct
from twomamba_jax.train.trainer import eval_totals, masked_sums, masks_documents, model_logits
from twomamba_jax.train.plot import save_figure
from twomamba_jax.train.workdir import Trained, load
from twomamba_jax.train.workdir import path as workdir_path

TASKS = ("ppl", "decode", "niah", "mqar")
ANSWER_TOKENS = 8  # generated per NIAH prompt: the key's digits and a little more (byte tokens: one per digit)


def perplexity(trained: Trained, lengths: list[int], *, batches: int, batch_size: int, progress=print) -> list[dict]:
    """One row per context length: {"length", "loss", "perplexity", "tokens"} (and "accuracy" for the synthetic
    tasks), over up to ``batches`` eval batches of ``batch_size`` rows."""
    rows = []
    for number, length in enumerate(lengths, start=1):
        started = time.perf_counter()
        dataset = make_dataset(dataclasses.replace(trained.config.data, seq_len=length, batch_size=batch_size))
        evaluate = _evaluator(trained.model, masks_documents(dataset, trained.config.data))
        loss, count, correct = evaluate(dataset.eval_batches(batches))
        row = {"length": length, "loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "tokens": count}
        if dataset.has_accuracy:
            row["accuracy"] = correct
        rows.append(row)
        progress(f"ppl: length {length} ({number}/{len(lengths)}): loss {row['loss']:.4f}, perplexity "
                 f"{row['perplexity']:.3f} over {row['tokens']} tokens, {time.perf_counter() - started:.1f}s")
    return rows


def recall(trained: Trained, lengths: list[int], *, kv_pairs: list[int], batches: int, batch_size: int,
           progress=print) -> list[dict]:
    """MQAR exact-match recall over a grid (Zoology-style): one row per (length, key-value pairs): {"length",
    "kv_pairs", "accuracy", "loss", "queries"} on the task's eval rows. For a model trained on ``mqar``."""
    data = trained.config.data
    if data.source != "mqar":
        raise ValueError(f"--task mqar: needs a model trained on data.source='mqar'; this run trained on "
                         f"{data.source!r}")
    for length in lengths:
        for pairs in kv_pairs:
            if not 1 <= pairs < data.vocab_size // 2 or length + 1 < 2 * pairs + 2:
                raise ValueError(f"--kv-pairs: {pairs} pairs need 1 <= pairs < vocab_size / 2 = "
                                 f"{data.vocab_size // 2} and --lengths of at least {2 * pairs + 1}; got length "
                                 f"{length}")
    evaluate = _evaluator(trained.model, masked=False)  # one sequence a row
    rows = []
    for length in lengths:
        started = time.perf_counter()
        for pairs in kv_pairs:
            dataset = make_dataset(dataclasses.replace(data, seq_len=length, batch_size=batch_size,
                                                       num_kv_pairs=pairs))
            loss, queries, accuracy = evaluate(dataset.eval_batches(batches))
            rows.append({"length": length, "kv_pairs": pairs, "accuracy": accuracy, "loss": loss,
                         "queries": queries})
        accuracies = " ".join(f"{row['accuracy']:.2f}" for row in rows[-len(kv_pairs):])
        progress(f"mqar: length {length}: accuracy by key-value pairs {accuracies}, "
                 f"{time.perf_counter() - started:.1f}s")
    return rows


def _evaluator(model, masked):
    """batches -> (mean loss, masked token count, exact-match rate) of ``model`` over them; ``masked``: each
    document of a row seen alone (the rows' segment ids), as the run trained (``masks_documents``)."""
    graphdef, params = nnx.split(model)
    sums = jax.jit(lambda params, batch: masked_sums(model_logits(nnx.merge(graphdef, params), batch, masked), batch))
    return functools.partial(eval_totals, sums, params)


def decode_state_bytes(config: nn.ModelConfig, batch_size: int, max_len: int) -> int:
    """Bytes of a ``LanguageModel``'s decoding cache for ``batch_size`` sequences of up to ``max_len`` tokens,
    from the config alone. Per layer, with H heads of dim d, states in float32 and caches in the compute dtype:

    - powers 1 and 2: H F d numbers (F = d, or d(d+1)/2 features for power 2) and H F more for the softmax
      normalizer, plus the conv history, (w - 1) 3 H d (the fused q, k, v channels);
    - exp (2Mamba-E): 2 max_len H d cached keys and values and max_len H float32 log-decays, a fill counter, and
      the conv history;
    - Mamba-2: H d_state head_dim (its SSM state, H = d_ssm / head_dim) and (w - 1)(d_ssm + 2 groups d_state);
    - softmax: 2 max_len Hkv d, a fill counter and each sequence's document start (int32).
    """
    mixer, heads, dim = config.mixer, config.num_heads, config.head_dim
    item, state = np.dtype(config.dtype).itemsize, 4
    counter = 0  # the KV caches' fill count: one int32 per layer, not per sequence
    if isinstance(mixer, nn.AttentionConfig):
        per_sequence, counter = 2 * max_len * (mixer.num_kv_heads or heads) * dim * item + 4, 4
    elif isinstance(mixer, nn.Mamba2Config):
        d_ssm = mixer.d_ssm or mixer.expand * config.model_dim
        per_sequence = (d_ssm // mixer.head_dim) * mixer.d_state * mixer.head_dim * state
        per_sequence += (mixer.conv_window - 1) * (d_ssm + 2 * mixer.num_groups * mixer.d_state) * item
    else:
        if mixer.power == "exp":
            per_sequence, counter = 2 * max_len * heads * dim * item + max_len * heads * state, 4
        else:
            features = feature_size(dim, mixer.power)
            per_sequence = heads * features * dim * state + (heads * features * state if mixer.norm == "softmax"
                                                             else 0)
        per_sequence += max(mixer.conv_window - 1, 0) * 3 * heads * dim * item
    return config.num_layers * (batch_size * per_sequence + counter)


def decode(trained: Trained, lengths: list[int], *, steps: int, progress=print) -> list[dict]:
    """One row per context length: {"context", "state_bytes" (measured), "analytic_bytes", "tokens_per_second"}
    for one sequence: a random prompt of that many tokens, then ``steps`` timed greedy decode steps."""
    model, config = trained.model, trained.model.config
    graphdef, params = nnx.split(model)
    prefill, step = compiled_steps(graphdef, 0.0, None, None)
    rng, key = np.random.default_rng(0), jax.random.key(0)
    rows = []
    for number, length in enumerate(lengths, start=1):
        cache = model.init_cache(1, max_len=length + steps + 1)
        measured = sum(leaf.nbytes for leaf in jax.tree.leaves(cache))
        prompt = rng.integers(0, config.vocab_size, (1, length), dtype=np.int32)
        token, cache = prefill(params, prompt, cache, key)
        token, cache = step(params, token, cache, key)  # compiles for this cache size
        jax.block_until_ready(token)
        started = time.perf_counter()
        for _ in range(steps):
            token, cache = step(params, token, cache, key)
        jax.block_until_ready(token)
        seconds = time.perf_counter() - started
        row = {"context": length, "state_bytes": int(measured),
               "analytic_bytes": decode_state_bytes(config, 1, length + steps + 1),
               "tokens_per_second": steps / seconds}
        rows.append(row)
        progress(f"decode: context {length} ({number}/{len(lengths)}): state {measured / 2**20:.3f} MiB "
                 f"(analytic {row['analytic_bytes'] / 2**20:.3f}), {row['tokens_per_second']:.1f} tokens/s")
    return rows


def needle_in_a_haystack(trained: Trained, lengths: list[int], *, depths: list[float], trials: int,
                         progress=print) -> list[dict]:
    """One row per (length, depth): {"length", "depth", "accuracy", "answers"}, over ``trials`` prompts each
    (seeded by their cell and trial, so reruns give the same prompts)."""
    tokenizer = trained.tokenizer
    if tokenizer is None:
        raise ValueError(f"--task niah: needs a model trained on text (data.source text:... or tfds:...); this run "
                         f"trained on {trained.config.data.source!r}")
    haystack, needed = [], max(lengths)
    for document in text_documents(trained.config.data)[1]:
        haystack += [*tokenizer.encode(document), tokenizer.eos_id]
        if len(haystack) >= 2 * needed:
            break
    haystack = np.asarray(haystack, np.int32)
    rows = []
    for number, length in enumerate(lengths, start=1):
        started = time.perf_counter()
        prompts = [build_prompt(haystack, tokenizer, length=length, depth=depth, seed=(length, d, t))
                   for d, depth in enumerate(depths) for t in range(trials)]
        tokens = generate(trained.model, np.stack([p.tokens for p in prompts]), max_new_tokens=ANSWER_TOKENS)
        answers = [tokenizer.decode(row) for row in np.asarray(tokens)[:, length:]]
        for d, depth in enumerate(depths):
            cell = range(d * trials, (d + 1) * trials)
            correct = [is_correct(answers[i], prompts[i].key) for i in cell]
            rows.append({"length": length, "depth": depth, "accuracy": sum(correct) / trials,
                         "answers": [[prompts[i].key, answers[i]] for i in cell]})
        accuracies = " ".join(f"{row['accuracy']:.2f}" for row in rows[-len(depths):])
        progress(f"niah: length {length} ({number}/{len(lengths)}): accuracy by depth {accuracies}, "
                 f"{time.perf_counter() - started:.1f}s")
    return rows


def run(workdir: str | os.PathLike, task: str, *, lengths: list[int] | None = None, batches: int | None = None,
        batch_size: int | None = None, steps: int = 32, depths: list[float] | None = None, trials: int = 4,
        kv_pairs: list[int] | None = None, progress=print) -> epath.Path:
    """Runs ``task`` on the newest checkpoint of ``workdir``; writes ``eval_TASK.json`` and ``eval_TASK.png``
    there and returns the JSON's path. Defaults: the training length, the run's batch size and eval batches."""
    if task not in TASKS:
        raise ValueError(f"--task: expected one of {', '.join(TASKS)}; got {task!r}")
    if lengths is not None and (not lengths or any(not isinstance(n, int) or n <= 0 for n in lengths)):
        raise ValueError(f"--lengths: expected positive integers; got {lengths}")
    if depths is not None and (not depths or any(not 0.0 <= depth <= 1.0 for depth in depths)):
        raise ValueError(f"--depths: expected fractions in [0, 1]; got {depths}")
    for name, value in (("--batches", batches), ("--batch-size", batch_size), ("--steps", steps),
                        ("--trials", trials)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name}: expected a positive integer; got {value!r}")
    trained = load(workdir)
    config = trained.config
    lengths = lengths or [config.data.seq_len]
    progress(f"{task}: step {trained.step} of {workdir} ({config.model.size} {config.model.mixer}, "
             f"{config.data.source}, trained at {config.data.seq_len} tokens)")
    if task == "ppl":
        rows = perplexity(trained, lengths, batches=batches or config.eval.batches,
                          batch_size=batch_size or config.data.batch_size, progress=progress)
    elif task == "mqar":
        rows = recall(trained, lengths, kv_pairs=kv_pairs or [config.data.num_kv_pairs],
                      batches=batches or config.eval.batches, batch_size=batch_size or config.data.batch_size,
                      progress=progress)
    elif task == "decode":
        rows = decode(trained, lengths, steps=steps, progress=progress)
    else:
        rows = needle_in_a_haystack(trained, lengths, depths=depths or [0.0, 0.25, 0.5, 0.75, 1.0], trials=trials,
                                    progress=progress)
    result = {"task": task, "step": trained.step, "mixer": config.model.mixer, "source": config.data.source,
              "train_length": config.data.seq_len, "results": rows}
    path = workdir_path(workdir) / f"eval_{task}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, path.with_suffix(".png"))
    progress(f"wrote {path} and {path.with_suffix('.png').name}")
    return path


def _plot(result: dict, output: epath.Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: leaves the caller's backend (a notebook's) as it is

    rows, mixer = result["results"], result["mixer"]
    title = f"{mixer} at step {result['step']}"
    if result["task"] == "ppl":
        fig = Figure(figsize=(6.5, 4.2))
        axis = fig.subplots()
        axis.plot([r["length"] for r in rows], [r["loss"] for r in rows], "o-", label=mixer)
        axis.axvline(result["train_length"], color="gray", linestyle=":", label="training length")
        axis.set(xscale="log", xlabel="context length (tokens)", ylabel="eval loss",
                 title=f"{title}: loss by context length")
        axis.legend(fontsize=8)
    elif result["task"] == "mqar":
        fig = Figure(figsize=(6.5, 4.2))
        axis = fig.subplots()
        for length in sorted({r["length"] for r in rows}):
            points = [(r["kv_pairs"], r["accuracy"]) for r in rows if r["length"] == length]
            axis.plot(*zip(*points), "o-", label=f"{length} tokens")
        axis.set(xlabel="key-value pairs", ylabel="exact-match recall", ylim=(0, 1.02), title=f"{title}: MQAR")
        axis.legend(fontsize=8)
    elif result["task"] == "niah":
        lengths, depths = sorted({r["length"] for r in rows}), sorted({r["depth"] for r in rows})
        grid = np.array([[next(r["accuracy"] for r in rows if r["length"] == n and r["depth"] == d) for n in lengths]
                         for d in depths])
        fig = Figure(figsize=(1.2 * len(lengths) + 3, 0.6 * len(depths) + 2.5))
        axis = fig.subplots()
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        axis.set(xticks=range(len(lengths)), xticklabels=lengths, yticks=range(len(depths)), yticklabels=depths,
                 xlabel="context length (tokens)", ylabel="needle depth", title=f"{title}: pass-key retrieval")
        for (i, j), value in np.ndenumerate(grid):
            axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(image, ax=axis, label="exact-match accuracy")
    else:
        fig = Figure(figsize=(11, 4.2))
        memory, speed = fig.subplots(1, 2)
        contexts = [r["context"] for r in rows]
        memory.plot(contexts, [r["state_bytes"] / 2**20 for r in rows], "o-", label=f"{mixer} (measured)")
        memory.plot(contexts, [r["analytic_bytes"] / 2**20 for r in rows], "k:", label="analytic")
        memory.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decoding state (MiB)",
                   title=f"{title}: decoding state")
        memory.legend(fontsize=8)
        speed.plot(contexts, [r["tokens_per_second"] for r in rows], "o-", label=mixer)
        speed.set(xscale="log", xlabel="context (tokens)", ylabel="tokens/s (batch 1)", title="decode speed")
    fig.tight_layout()
    save_figure(fig, output)
