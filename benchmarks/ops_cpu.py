"""Times the reference (dense), chunked (lax.scan) and associative paths of decayed_attention.

    python benchmarks/ops_cpu.py                      # B=1, H=2, d=64, power 2, N in {1k, 4k, 16k}
    python benchmarks/ops_cpu.py --lengths 2048 --power 1 --backward

Prints one table: ms per call (median of --repeats after a warm-up), the inputs' relative error against the
reference where the reference fits in memory, and the peak bytes XLA plans for the computation.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from twomamba_jax import ops

DENSE_BYTES_LIMIT = 8 * 2**30  # skip the dense form when its N x N intermediates would exceed this


def _time(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _peak_bytes(fn, args):
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return None if stats is None else stats.temp_size_in_bytes + stats.output_size_in_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--power", type=int, default=2, choices=[1, 2])
    parser.add_argument("--chunk-size", type=int, default=ops.DEFAULT_CHUNK_SIZE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    args = parser.parse_args()

    rows = []
    for length in args.lengths:
        rng = np.random.default_rng(length)
        shape = (args.batch, length, args.heads, args.dim)
        q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
        log_decay = jnp.asarray(-rng.uniform(0, 0.1, shape[:3]), jnp.float32)
        inputs = (q, k, v, log_decay)
        outputs = {}
        for impl in ("reference", "chunked", "associative"):
            dense_bytes = 2 * args.batch * args.heads * length * length * 4
            if impl == "reference" and dense_bytes > DENSE_BYTES_LIMIT:
                rows.append((length, impl, None, None, f"skipped: ~{dense_bytes / 2**30:.0f} GiB of N x N"))
                continue

            def forward(q, k, v, a, impl=impl):
                return ops.decayed_attention(q, k, v, a, power=args.power, normalize="softmax", impl=impl,
                                             chunk_size=args.chunk_size)

            fn = forward
            if args.backward:
                fn = lambda q, k, v, a, forward=forward: jax.grad(
                    lambda *x: jnp.sum(forward(*x) ** 2), argnums=(0, 1, 2, 3))(q, k, v, a)
            fn = jax.jit(fn)
            ms = _time(fn, inputs, args.repeats)
            outputs[impl] = forward(*inputs)
            error = ""
            if impl != "reference" and "reference" in outputs:
                diff = np.linalg.norm(np.asarray(outputs[impl] - outputs["reference"]))
                error = f"{diff / np.linalg.norm(np.asarray(outputs['reference'])):.1e}"
            rows.append((length, impl, ms, _peak_bytes(fn, inputs), error))
            print(f"  N={length:>6} {impl:<12} {ms:10.1f} ms", flush=True)

    mode = "fwd+bwd" if args.backward else "fwd"
    print(f"\ndecayed_attention on {jax.devices()[0].device_kind}, jax {jax.__version__}: B={args.batch}, "
          f"H={args.heads}, d={args.dim}, power {args.power}, softmax norm, chunk {args.chunk_size}, float32, {mode}")
    print(f"| {'N':>6} | {'impl':<12} | {'ms':>10} | {'peak MiB':>9} | rel. err vs reference |")
    print(f"|{'-' * 8}|{'-' * 14}|{'-' * 12}|{'-' * 11}|{'-' * 23}|")
    for length, impl, ms, peak, note in rows:
        ms_text = "-" if ms is None else f"{ms:.1f}"
        peak_text = "-" if peak is None else f"{peak / 2**20:.0f}"
        print(f"| {length:>6} | {impl:<12} | {ms_text:>10} | {peak_text:>9} | {note:<21} |")


if __name__ == "__main__":
    main()
