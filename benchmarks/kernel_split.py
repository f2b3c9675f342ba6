"""Where the time of one forward + backward goes: the GPU time of each kernel, from a profiler trace.

    python benchmarks/kernel_split.py                                  # 2Mamba and cuDNN at 4x2048 and 4x8192
    python benchmarks/kernel_split.py --cores 2mamba-e --shapes 4x4096 --heads 8 --dim 128
    python benchmarks/kernel_split.py --shapes 1x32768 --impls pallas_chunked pallas_chunked_triton

Runs ``steps`` forward + backward steps of each mixer core (as ``benchmarks/kernels.py`` defines them, through
``ops.decayed_attention(impl=...)`` for each of ``--impls``, default the flash-style ``pallas_parallel``; on
Hopper ``pallas_chunked`` runs the Mosaic GPU chunked kernels and ``pallas_chunked_triton`` the Triton ones) and
of cuDNN softmax under ``jax.profiler.trace``, reads the trace back (``jax.profiler.ProfileData``) and prints,
per kernel, its GPU time per step and share of the step's kernel time: our kernels by name
(``twomamba_mosaic_*``, ``twomamba_chunked_*``), XLA's fusions, copies and reductions around them by theirs. The
sum is kernel time only; gaps between kernels (launch latency) are the difference to the wall time per step,
printed beside it.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from twomamba_jax import ops
from twomamba_jax.kernels.chunked import chunked_attention_pallas

CORES = {"2mamba": dict(power=2, normalize="softmax"), "power1": dict(power=1, normalize=None),
         "2mamba-e": dict(power="exp", normalize="softmax")}
IMPLS = ("pallas_parallel", "pallas_chunked", "pallas_chunked_triton")
SHOWN = 8  # kernels listed per table; the rest are summed into one row


def _core(q, k, v, a, *, core, impl):
    if impl == "pallas_chunked_triton":
        return chunked_attention_pallas(q, k, v, a, scale=q.shape[-1] ** -0.5, chunk_size=64, backend="triton",
                                        **core)
    return ops.decayed_attention(q, k, v, a, impl=impl, **core)


def kernel_times(step, args, steps):
    """(kernel name -> GPU ns per step, wall ns per step) of ``steps`` calls of ``step(*args)``."""
    def run():
        out = None
        for _ in range(steps):
            out = step(*args)
        jax.block_until_ready(out)

    run()  # compiles and warms up
    start = time.perf_counter_ns()
    run()  # the wall time, untraced
    wall = (time.perf_counter_ns() - start) / steps
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            run()
        trace = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    totals = collections.Counter()
    for plane in trace.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name.startswith("Stream"):  # kernels and copies as they ran (not XLA's op annotations)
                for event in line.events:
                    totals[event.name] += event.duration_ns / steps
    if not totals:
        lines = sorted({f"{plane.name}: {line.name}" for plane in trace.planes for line in plane.lines})
        raise SystemExit(f"kernel_split: no GPU stream lines in the trace; it has {lines}")
    return totals, wall


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", nargs="+", default=["2mamba"], choices=list(CORES))
    parser.add_argument("--shapes", nargs="+", default=["4x2048", "4x8192"], help="BxN pairs")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--impls", nargs="+", default=["pallas_parallel"], choices=list(IMPLS))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        raise SystemExit("kernel_split: needs a GPU (the trace's per-kernel device times)")
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, H={args.heads}, d={args.dim}, bf16, "
          f"forward + backward, GPU time per step")
    for shape in args.shapes:
        batch, length = (int(n) for n in shape.split("x"))
        rng = np.random.default_rng(0)
        dims = (batch, length, args.heads, args.dim)
        q, k, v, cotangent = (jnp.asarray(rng.standard_normal(dims), jnp.bfloat16) for _ in range(4))
        log_decay = jnp.asarray(-np.log1p(np.exp(rng.standard_normal(dims[:3]) - 4.0)), jnp.float32)
        paths = {"softmax cuDNN": lambda q, k, v, a: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                                    implementation="cudnn")}
        for name in args.cores:
            for impl in args.impls:
                if CORES[name]["power"] == "exp" and impl != "pallas_parallel":
                    continue  # exp has no finite state: no chunked form
                paths[f"{name} {impl}"] = functools.partial(_core, core=CORES[name], impl=impl)
        for name, forward in paths.items():
            loss = lambda q, k, v, a, c, forward=forward: jnp.sum(forward(q, k, v, a).astype(jnp.float32) * c)
            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
            totals, wall = kernel_times(step, (q, k, v, log_decay, cotangent), args.steps)
            busy = sum(totals.values())
            print(f"\n{batch}x{length} {name}: wall {wall / 1e6:.3f} ms/step, kernels {busy / 1e6:.3f} ms "
                  f"({len(totals)} kinds)")
            print("| kernel | ms per step | share |\n|---|---|---|")
            ranked = totals.most_common()
            rest = sum(ns for _, ns in ranked[SHOWN:])
            for kernel, ns in ranked[:SHOWN]:
                print(f"| {kernel[:90]} | {ns / 1e6:.3f} | {ns / busy:.1%} |")
            if rest:
                print(f"| ({len(ranked) - SHOWN} others) | {rest / 1e6:.3f} | {rest / busy:.1%} |")


if __name__ == "__main__":
    main()
