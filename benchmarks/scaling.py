"""Training on several GPUs of one host: step time, tokens/s, MFU, memory and the first loss, per mesh.

    python benchmarks/scaling.py                          # small and medium; softmax and 2mamba; 1, 2, 4, 8 GPUs
    python benchmarks/scaling.py --sizes small --mixers 2mamba --gpus 1 8 --meshes data fsdp
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/scaling.py --smoke   # checks it on CPU

Every row builds the model as ``twomamba-train`` does (the trainer's ``setup``: float32 parameters and AdamW
state, bf16 compute, blocks rematerialized) on the first G devices, with one of the meshes (data, fsdp, tensor):
``data`` (G, 1, 1), ``fsdp`` (1, G, 1), ``data x tensor`` (G/T, 1, T) and ``fsdp x tensor`` (1, G/T, T), T =
``--tensor``. Each GPU gets ``--rows-per-gpu`` x ``--length`` tokens, so at one G every mesh trains the same global
batch of random tokens. Columns: median step time after warm-up steps (compile excluded), tokens/s, scaling
efficiency (tokens/s over G times the one-GPU data-parallel row's), MFU (the trainer's FLOP count over G dense
bf16 peaks), the memory XLA plans per GPU for the step (arguments + outputs + temporaries, less donated
buffers) and the loss of step 1 (the loss of the initial parameters on the first batch) with its relative
difference from the same batch's loss on one GPU, which must agree to bf16 tolerance (~1e-2).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import numpy as np

from twomamba_jax.train import config as train_config
from twomamba_jax.train.metrics import peak_flops
from twomamba_jax.train.trainer import setup

MESHES = {  # name -> (data, fsdp, tensor) for G devices and tensor width T
    "data": lambda g, t: (g, 1, 1),
    "fsdp": lambda g, t: (1, g, 1),
    "data x tensor": lambda g, t: (g // t, 1, t),
    "fsdp x tensor": lambda g, t: (1, g // t, t),
}


def _config(size: str, mixer: str, rows: int, mesh: tuple[int, int, int], args) -> train_config.TrainConfig:
    config = train_config.load_config("small")
    model = dataclasses.replace(config.model, size=size, mixer=mixer, remat=True)
    data = dataclasses.replace(config.data, source="mqar", seq_len=args.length, batch_size=rows,
                               vocab_size=args.vocab_size)
    data_axis, fsdp, tensor = mesh
    mesh_config = dataclasses.replace(config.mesh, data=data_axis, fsdp=fsdp, tensor=tensor)
    return dataclasses.replace(config, model=model, data=data, mesh=mesh_config, precision="bfloat16")


def _tokens(rows: int, args) -> dict:
    """The same random rows for every mesh of one global batch size."""
    tokens = np.random.default_rng(rows).integers(0, args.vocab_size, (rows, args.length + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones(tokens[:, 1:].shape, np.float32),
            "segment_ids": np.ones(tokens[:, 1:].shape, np.int32)}


def reference_loss(size: str, mixer: str, rows: int, args) -> float:
    """The first batch's loss under the initial parameters on one device, in slices of ``--rows-per-gpu`` rows."""
    run = setup(_config(size, mixer, args.rows_per_gpu, (1, 1, 1), args), devices=jax.devices()[:1])
    batch, total, count = _tokens(rows, args), 0.0, 0.0
    with jax.set_mesh(run.mesh):
        params, evaluate = run.init_state()["params"], run.eval_step()
        for start in range(0, rows, args.rows_per_gpu):
            part = run.global_batch({k: v[start:start + args.rows_per_gpu] for k, v in batch.items()})
            sums = jax.device_get(evaluate(params, part))
            total, count = total + float(sums[0]), count + float(sums[1])
    return total / count


def measure(size: str, mixer: str, gpus: int, mesh: tuple[int, int, int], args) -> dict:
    rows = args.rows_per_gpu * gpus
    run = setup(_config(size, mixer, rows, mesh, args), devices=jax.devices()[:gpus])
    with jax.set_mesh(run.mesh):
        state, batch = run.init_state(), run.global_batch(_tokens(rows, args))
        step = run.train_step().trace(state, batch).lower().compile()
        memory = step.memory_analysis()
        state, metrics = step(state, batch)
        first_loss = float(metrics["loss"])
        for _ in range(args.warmup):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    tokens_per_second = rows * args.length / seconds
    flops = run.flops_per_token()
    peak = peak_flops(jax.devices()[0], "bfloat16")
    planned = None
    if memory is not None:
        planned = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                   - memory.alias_size_in_bytes)
    return dict(params=run.num_params, step_ms=seconds * 1e3, tokens_per_second=tokens_per_second,
                mfu=tokens_per_second * flops / (peak * gpus) if peak else None, memory=planned,
                first_loss=first_loss)


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["small", "medium"], help="tiny | small | medium")
    parser.add_argument("--mixers", nargs="+", default=["softmax", "2mamba"], help="mixer presets")
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 2, 4, 8], help="device counts to use")
    parser.add_argument("--meshes", nargs="+", default=list(MESHES), choices=list(MESHES), metavar="MESH",
                        help=f"of {', '.join(MESHES)}")
    parser.add_argument("--tensor", type=int, default=2, help="tensor-parallel width of the tensor meshes")
    parser.add_argument("--rows-per-gpu", type=int, default=8, help="rows of each GPU's share of a step")
    parser.add_argument("--length", type=int, default=2048, help="tokens per row")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--smoke", action="store_true", help="tiny model and rows, to check the script")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.rows_per_gpu, args.length, args.vocab_size, args.warmup, args.steps = \
            ["tiny"], 2, 64, 256, 1, 2
    for gpus in args.gpus:
        if not 1 <= gpus <= jax.device_count():
            parser.error(f"--gpus: {gpus} is not between 1 and the {jax.device_count()} devices here")
    if args.tensor < 1:
        parser.error(f"--tensor: expected a positive int; got {args.tensor}")
    return args


def main(argv=None) -> list[str]:
    args = _parse(argv)
    device = jax.devices()[0]
    print(f"{jax.device_count()} x {device.device_kind}, jax {jax.__version__}; {args.rows_per_gpu} x "
          f"{args.length} tokens per GPU; median of {args.steps} steps after {args.warmup}", flush=True)
    header = ("| size | mixer | GPUs | mesh (data, fsdp, tensor) | step ms | tokens/s | scaling | MFU | memory/GPU | "
              "loss of step 1 | vs 1 GPU |")
    rows = []
    for size in args.sizes:
        for mixer in args.mixers:
            single = None
            for gpus in args.gpus:
                reference = reference_loss(size, mixer, args.rows_per_gpu * gpus, args)
                seen = set()
                for name in args.meshes:
                    mesh = MESHES[name](gpus, args.tensor)
                    if ("tensor" in name and (gpus < args.tensor or gpus % args.tensor)) or mesh in seen:
                        continue  # no tensor mesh of that width on these devices, or the same mesh again
                    seen.add(mesh)
                    label = f"| {size} | {mixer} | {gpus} | {name} {mesh} |"
                    try:
                        result = measure(size, mixer, gpus, mesh, args)
                    except Exception as error:  # report and go on: one failing mesh must not hide the others
                        rows.append(f"{label} failed: {type(error).__name__}: {str(error)[:200]} |")
                        print(rows[-1], flush=True)
                        continue
                    if gpus == 1 and name == "data":
                        single = result["tokens_per_second"]
                    scaling = f"{result['tokens_per_second'] / (gpus * single):.2f}" if single else "–"
                    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a"
                    memory = f"{result['memory'] / 2**30:.2f} GiB" if result["memory"] is not None else "n/a"
                    difference = abs(result["first_loss"] - reference) / reference
                    rows.append(f"{label} {result['step_ms']:.1f} | {result['tokens_per_second'] / 1e3:.1f}k | "
                                f"{scaling} | {mfu} | {memory} | {result['first_loss']:.4f} | {difference:.1e} |")
                    print(rows[-1], flush=True)
    print("\n" + header)
    print("|" + "---|" * (header.count("|") - 1))
    print("\n".join(rows))
    return rows


if __name__ == "__main__":
    main()
