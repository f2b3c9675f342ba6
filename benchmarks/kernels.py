"""Checks and times the decayed-attention paths at the PERF.md shapes, in one run, and prints one table.

    python benchmarks/kernels.py                     # the PERF.md shapes and 1x65536, 1x131072 (an accelerator)
    python benchmarks/kernels.py --smoke             # tiny shapes, e.g. on CPU, to check the script itself
    python benchmarks/kernels.py --documents 400     # packed rows: documents of ~400 tokens, masked (segment_ids)

For each mixer core (2Mamba: power 2, softmax norm, decay; Mamba-2S core: power 1, no norm, decay; 2Mamba-E: exp,
softmax norm, decay) and shape it times every path (the flash-style and the chunked Pallas kernels, the jnp chunked
form, the dense XLA form) and cuDNN softmax attention
as the yardstick (every row also as a ratio to cuDNN's forward and forward + backward times of the same run), with
jax's own Mosaic GPU FlashAttention-3 beside it (what Mosaic GPU reaches on this machine): ms of the forward and of
forward + backward (median of samples of 10 back-to-back calls on rotating inputs), TFLOP/s-equivalent (the
FLOPs of causal softmax attention at that shape: 2 B H N^2 d forward, 3.5x that for forward + backward), and the
relative Frobenius errors of the output and of dq, dk, dv and the log-decay's gradient (for a fixed random output
cotangent) against the jnp chunked form
(the dense form for exp, where it fits) on the same inputs upcast to float32, at full matmul precision (both tested
against the float64 oracle on CPU). With ``--documents MEAN`` every decayed path (and its reference) masks rows
packed with documents of MEAN tokens on average (exponential lengths, seeded), through ``segment_ids``; cuDNN
stays unmasked, the yardstick of the same shapes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from twomamba_jax import ops
from twomamba_jax.kernels.chunked import chunked_attention_pallas
from twomamba_jax.kernels.parallel import parallel_attention_pallas

PERF_SHAPES = [(4, 2048), (4, 8192), (1, 32768), (1, 65536), (1, 131072)]
SMOKE_SHAPES = [(1, 256)]
CORES = {"2mamba": dict(power=2, normalize="softmax"), "power1": dict(power=1, normalize=None),
         "2mamba-e": dict(power="exp", normalize="softmax")}
# "pallas_parallel_triton" / "pallas_chunked_triton": the flash-style / chunked kernels forced onto the Triton
# lowering (on Hopper "pallas_parallel" and, for power 2 at d 64, "pallas_chunked" run the Mosaic GPU kernels).
IMPLS = ("pallas_parallel", "pallas_parallel_triton", "pallas_chunked", "pallas_chunked_triton", "chunked",
         "reference")
DENSE_MAX_BYTES = 24 * 2**30
ROTATIONS = 3


def _median_ms(fn, input_sets, repeats, calls=10):
    """Median over ``repeats`` samples of the mean time of ``calls`` back-to-back calls on rotating inputs: the
    calls queue up asynchronously, so the host's dispatch time overlaps the device's work instead of adding to
    it (a single timed call of a 0.1 ms kernel measures mostly dispatch)."""
    jax.block_until_ready(fn(*input_sets[0]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(calls):
            out = fn(*input_sets[i % len(input_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times) * 1e3


def _inputs(seed, batch, length, heads, dim, dtype):
    rng = np.random.default_rng(seed)
    shape = (batch, length, heads, dim)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))
    log_decay = jnp.asarray(-np.log1p(np.exp(rng.standard_normal(shape[:3]) - 4.0)), jnp.float32)  # softplus
    return q, k, v, log_decay


def _attention_mgpu(q, k, v, a):
    """jax's own Mosaic GPU FlashAttention-3 (causal softmax, forward only: its backward takes no causal mask);
    it stages tiles as float16, so it runs on float16 copies."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
    q, k, v = (x.astype(jnp.float16) for x in (q, k, v))
    return attention_mgpu.attention(q, k, v, config).astype(jnp.bfloat16)


def _segment_ids(batch, length, mean):
    """(B, N) int32 ids of rows packed with documents of ``mean`` tokens on average (exponential lengths)."""
    rng = np.random.default_rng(7)
    lengths = np.maximum(1, rng.exponential(mean, (batch, length)).astype(int))  # more than enough documents
    starts = np.cumsum(lengths, axis=1) - lengths
    ids = np.stack([np.searchsorted(row, np.arange(length), side="right") for row in starts])
    return jnp.asarray(ids, jnp.int32)


def _rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cores", nargs="+", default=list(CORES), choices=list(CORES))
    parser.add_argument("--shapes", nargs="+", default=None, help="BxN pairs, e.g. 4x2048 1x32768")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--documents", type=int, default=None, metavar="MEAN",
                        help="mask rows packed with documents of MEAN tokens on average (segment_ids)")
    args = parser.parse_args()
    if args.documents is not None and args.documents < 1:
        parser.error(f"--documents: expected a positive mean document length; got {args.documents}")
    shapes = SMOKE_SHAPES if args.smoke else PERF_SHAPES
    if args.shapes:
        shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes]
    heads, dim, dtype = args.heads, args.dim, jnp.bfloat16
    device = jax.devices()[0]
    masked = "" if args.documents is None else f", documents of ~{args.documents} tokens masked (cuDNN unmasked)"
    print(f"{device.device_kind}, jax {jax.__version__}, H={heads}, d={dim}, bf16, chunk {args.chunk_size}{masked}; "
          "errors vs jnp chunked float32 (highest precision)")
    print("| B x N | path | fwd ms | fwd+bwd ms | fwd / cuDNN | fwd+bwd / cuDNN | TFLOP/s-eq (fwd+bwd) | rel err y | "
          "rel err dq dk dv da |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)

    for batch, length in shapes:
        input_sets = [_inputs(seed, batch, length, heads, dim, dtype) for seed in range(ROTATIONS)]
        cotangent = jnp.asarray(np.random.default_rng(99).standard_normal((batch, length, heads, dim)), jnp.float32)
        flops = 2 * batch * heads * length**2 * dim
        ids = None if args.documents is None else _segment_ids(batch, length, args.documents)
        paths = {}
        if jax.default_backend() == "gpu":  # the yardsticks first: every row is also a ratio to cuDNN's times
            paths["softmax cuDNN"] = (lambda q, k, v, a: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn"), None)
            paths["softmax attention_mgpu (jax's Mosaic GPU FA3; fp16, fwd only)"] = (_attention_mgpu, None)
        for core_name in args.cores:
            core = CORES[core_name]
            for impl in args.impls:
                if impl == "reference" and 4 * batch * heads * length**2 * 4 > DENSE_MAX_BYTES:
                    continue
                if core["power"] == "exp" and impl in ("pallas_chunked", "pallas_chunked_triton", "chunked"):
                    continue  # no finite state
                if impl == "pallas_parallel_triton":
                    if ids is not None:
                        continue  # the kernel alone takes no segment ids (decayed_attention makes their log-decay)
                    paths[f"{core_name} {impl}"] = (lambda q, k, v, a, core=core: parallel_attention_pallas(
                        q, k, v, a, scale=1 / np.sqrt(q.shape[-1]), backend="triton", **core), core)
                    continue
                if impl == "pallas_chunked_triton":
                    if ids is not None:
                        continue  # as above
                    paths[f"{core_name} {impl}"] = (lambda q, k, v, a, core=core: chunked_attention_pallas(
                        q, k, v, a, scale=1 / np.sqrt(q.shape[-1]), chunk_size=args.chunk_size, backend="triton",
                        interpret=jax.default_backend() == "cpu", **core), core)
                    continue
                paths[f"{core_name} {impl}"] = (lambda q, k, v, a, impl=impl, core=core: ops.decayed_attention(
                    q, k, v, a, impl=impl, chunk_size=args.chunk_size, segment_ids=ids, **core), core)

        oracles, yardstick = {}, None
        with_cotangent = [(*inputs, cotangent) for inputs in input_sets]
        for name, (forward, core) in paths.items():
            # The cotangent is an argument, not a constant XLA would fold into the backward at compile time.
            loss = lambda q, k, v, a, c, forward=forward: jnp.sum(forward(q, k, v, a).astype(jnp.float32) * c)
            fwd = jax.jit(forward)
            # value_and_grad: the loss value keeps the forward from being dead code next to its own backward.
            fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
            try:
                ms_fwd = _median_ms(fwd, input_sets, args.repeats)
                ms_both = (float("nan") if forward is _attention_mgpu
                           else _median_ms(fwd_bwd, with_cotangent, args.repeats))
            except Exception as error:  # report and go on: one broken path must not hide the others
                print(f"| {batch}x{length} | {name} | - | - | - | failed: {type(error).__name__}: "
                      f"{str(error)[:200]} | |", flush=True)
                continue
            error_y = error_grads = ""
            if core is not None:
                key = tuple(sorted(core.items(), key=str))
                exact_impl = "reference" if core["power"] == "exp" else "chunked"
                if exact_impl == "reference" and 4 * batch * heads * length**2 * 4 > DENSE_MAX_BYTES:
                    key = None  # no affordable oracle at this length
                if key is not None and key not in oracles:
                    q, k, v, a = (x.astype(jnp.float32) for x in input_sets[0])
                    with jax.default_matmul_precision("highest"):
                        exact = lambda q, k, v, a: ops.decayed_attention(q, k, v, a, impl=exact_impl,
                                                                         segment_ids=ids, **core)
                        try:
                            oracles[key] = (jax.jit(exact)(q, k, v, a), jax.jit(jax.grad(
                                lambda q, k, v, a: jnp.sum(exact(q, k, v, a) * cotangent), argnums=(0, 1, 2, 3)))(
                                    q, k, v, a))
                        except Exception as error:  # e.g. out of memory at the longest shapes: no error columns
                            print(f"({batch}x{length}: no float32 reference for {name}: "
                                  f"{type(error).__name__}: {str(error)[:120]})", flush=True)
                            oracles[key] = None
                if key is not None and oracles[key] is None:
                    key = None
                if key is not None:
                    y_ref, grads_ref = oracles[key]
                    error_y = f"{_rel(fwd(*input_sets[0]), y_ref):.1e}"
                    grads = fwd_bwd(*with_cotangent[0])[1]
                    error_grads = " ".join(f"{_rel(g, g_ref):.1e}" for g, g_ref in zip(grads, grads_ref))
            tflops = 3.5 * flops / (ms_both * 1e-3) / 1e12
            yardstick = yardstick or (ms_fwd, ms_both)
            print(f"| {batch}x{length} | {name} | {ms_fwd:.2f} | {ms_both:.2f} | {ms_fwd / yardstick[0]:.2f} | "
                  f"{ms_both / yardstick[1]:.2f} | {tflops:.1f} | {error_y} | {error_grads} |", flush=True)


if __name__ == "__main__":
    main()
