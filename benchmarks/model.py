"""Whole-model training speed and compile time per mixer, in one run, as one table.

    python benchmarks/model.py                                  # small LM (276M), 16x2048 and 4x8192, bf16
    python benchmarks/model.py --mixers linear 2mamba --shapes 32x1024 --layers 6 --model-dim 512
    python benchmarks/model.py --smoke                          # tiny model and shapes, e.g. on CPU
    python benchmarks/model.py --mixers softmax 2mamba --shapes 16x2048 --profile 25   # + where the time goes
    python benchmarks/model.py --mixers softmax 2mamba --shapes 1x32768 --remat-policy save_attention

Each mixer is built exactly as ``twomamba-train`` builds it (the trainer's ``setup``: float32 parameters and AdamW
state, sharded over all local devices, bf16 compute, per-block remat; ``--remat-policy save_attention`` keeps the
attention kernels' outputs rather than recomputing them, for every mixer alike: Pallas kernels and cuDNN) and fed
random tokens. Columns: compile time of the train step and of the eval step (lower + compile, seconds),
steady-state tokens/s (median of timed steps after warm-up steps; compile excluded), its ratio to the first mixer
listed (softmax by default) and MFU (the trainer's FLOP count: 6 per matmul parameter plus softmax attention's
causal core for every mixer, so that mixers compare at equal work, over the device's dense bf16 peak: a chunked
mixer at long rows does fewer FLOPs than counted and can read above 100%, e.g. mamba2s at 1 x 32768). ``--profile
K`` also traces a few steps per row and prints the K device operations (kernels, XLA fusions, copies) that took
the most time per step, so a gap between two mixers can be pinned to operations.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from twomamba_jax.nn.model import REMAT_POLICIES
from twomamba_jax.train import config as train_config
from twomamba_jax.train.metrics import peak_flops
from twomamba_jax.train.trainer import setup

MIXERS = ("softmax", "2mamba", "2mamba-e", "mamba2s")
SHAPES = ("16x2048", "4x8192")


def _config(mixer: str, batch: int, length: int, args) -> train_config.TrainConfig:
    config = train_config.load_config("small")
    model = dataclasses.replace(config.model, size=args.size, mixer=mixer, remat=not args.no_remat,
                                remat_policy=args.remat_policy, num_layers=args.layers, model_dim=args.model_dim)
    data = dataclasses.replace(config.data, source="mqar", seq_len=length, batch_size=batch,
                               vocab_size=args.vocab_size)
    return dataclasses.replace(config, model=model, data=data, precision=args.precision)


def _random_batch(run, rng, batch: int, length: int, vocab: int) -> dict:
    tokens = rng.integers(0, vocab, (batch, length + 1), dtype=np.int32)
    local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, length), np.float32),
             "segment_ids": np.ones((batch, length), np.int32)}
    return run.global_batch(local)


def measure(mixer: str, batch: int, length: int, args) -> dict:
    run = setup(_config(mixer, batch, length, args))
    rng = np.random.default_rng(0)
    vocab = run.model_config.vocab_size
    batches = [_random_batch(run, rng, batch, length, vocab) for _ in range(2)]
    with jax.set_mesh(run.mesh):
        state = run.init_state()
        started = time.perf_counter()
        train_step = run.train_step().trace(state, batches[0]).lower().compile()
        compile_train = time.perf_counter() - started
        started = time.perf_counter()
        run.eval_step().trace(state["params"], batches[0]).lower().compile()
        compile_eval = time.perf_counter() - started
        for i in range(args.warmup):
            state, metrics = train_step(state, batches[i % 2])
        jax.block_until_ready(metrics)
        times = []
        for i in range(args.steps):
            started = time.perf_counter()
            state, metrics = train_step(state, batches[i % 2])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - started)
        profile = _profile(train_step, state, batches[0], args.profile) if args.profile else None
    seconds = statistics.median(times)
    tokens_per_second = batch * length / seconds
    flops = run.flops_per_token()
    peak = peak_flops(jax.devices()[0], "bfloat16")
    mfu = tokens_per_second * flops / (peak * jax.device_count()) if peak else None
    return dict(params=run.num_params, compile_train=compile_train, compile_eval=compile_eval,
                step_ms=seconds * 1e3, tokens_per_second=tokens_per_second, mfu=mfu,
                loss=float(metrics["loss"]), profile=profile)


def _profile(train_step, state, batch, top: int, steps: int = 3) -> list[tuple[str, float, int]]:
    """The ``top`` operations of the first device by time per step over ``steps`` traced steps: (name, ms per
    step, launches per step), names with their numeric suffixes folded (``fusion.12`` and ``fusion.7`` count
    together)."""
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            for _ in range(steps):
                state, metrics = train_step(state, batch)
            jax.block_until_ready(metrics)
        data = jax.profiler.ProfileData.from_file(str(next(Path(directory).rglob("*.xplane.pb"))))
    totals, counts = collections.Counter(), collections.Counter()
    for plane in data.planes:
        if not plane.name.startswith("/device:") or not plane.name.endswith(":0"):  # the first device's work
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower() and line.name != "XLA Ops":  # GPU streams, TPU ops
                continue
            for event in line.events:
                name = re.sub(r"[._]\d+$", "", event.name)
                totals[name] += event.duration_ns / 1e6 / steps
                counts[name] += 1
    return [(name, ms, counts[name] // steps) for name, ms in totals.most_common(top)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", nargs="+", default=list(MIXERS), help="mixer presets; the first is the yardstick")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="BxN pairs (rows x tokens per step)")
    parser.add_argument("--size", default="small", help="tiny | small | medium")
    parser.add_argument("--layers", type=int, default=None, help="override of the size's layer count")
    parser.add_argument("--model-dim", type=int, default=None, help="override of the size's width")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--precision", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--no-remat", action="store_true", help="keep activations instead of rematerializing")
    parser.add_argument("--remat-policy", default="full", choices=tuple(REMAT_POLICIES),
                        help="what the backward recomputes: the whole block, or all but the attention kernels")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--profile", type=int, default=0, metavar="K",
                        help="also print the K device operations that take the most time per step")
    parser.add_argument("--smoke", action="store_true", help="tiny model and shapes, to check the script")
    args = parser.parse_args()
    if args.no_remat and args.remat_policy != "full":
        parser.error("--remat-policy: applies only with remat (drop --no-remat)")
    if args.smoke:
        args.size, args.shapes, args.vocab_size, args.warmup, args.steps = "tiny", ["2x64"], 256, 1, 2
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes]
    device = jax.devices()[0]
    print(f"{jax.device_count()} x {device.device_kind}, jax {jax.__version__}, size {args.size}"
          f"{f', {args.layers} layers' if args.layers else ''}{f', M={args.model_dim}' if args.model_dim else ''}, "
          f"{args.precision}, remat {'off' if args.no_remat else args.remat_policy}; "
          f"median of {args.steps} steps after {args.warmup}", flush=True)
    rows = []
    for batch, length in shapes:
        yardstick = None
        for mixer in args.mixers:
            try:
                result = measure(mixer, batch, length, args)
            except Exception as error:  # report and go on: one broken mixer must not hide the others
                rows.append(f"| {batch}x{length} | {mixer} | failed: {type(error).__name__}: {str(error)[:200]} |")
                print(rows[-1], flush=True)
                continue
            yardstick = yardstick or result["tokens_per_second"]
            mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a"
            rows.append(f"| {batch}x{length} | {mixer} | {result['params'] / 1e6:.1f}M | "
                        f"{result['compile_train']:.1f} | {result['compile_eval']:.1f} | {result['step_ms']:.1f} | "
                        f"{result['tokens_per_second'] / 1e3:.1f}k | "
                        f"{result['tokens_per_second'] / yardstick:.2f} | {mfu} |")
            print(rows[-1], flush=True)
            if result["profile"] == []:
                print("  (no device operations traced: on CPU the profile is empty)")
            elif result["profile"]:
                total = sum(ms for _, ms, _ in result["profile"])
                print(f"  top {args.profile} device operations, {total:.1f} ms per step of {result['step_ms']:.1f}:")
                for name, ms, launches in result["profile"]:
                    print(f"  {ms:8.2f} ms  x{launches:<4} {name[:110]}", flush=True)
    print("\n| B x N | mixer | params | compile train s | compile eval s | step ms | tokens/s | vs first | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
