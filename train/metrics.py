"""Metrics: a progress line (loss, tokens/s, MFU estimate, ETA), a JSONL file of everything logged, TensorBoard
event files (with tensorboardX installed), and the model FLOPs behind the MFU estimate.

Throughput counts training time only: the train step is compiled before the clock starts, and evaluations and
checkpoint saves run inside ``MetricsLogger.excluded``, which takes their time out of the tokens/s and MFU of
the interval they fall in."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time

import jax
from etils import epath

from twomamba_jax.train.workdir import is_remote

_logger = logging.getLogger(__name__)

# Dense peak matmul FLOP/s per chip by jax device_kind (vendor figures), for the MFU estimate: bfloat16, and
# float32 at JAX's default matmul precision (TF32 tensor cores on these GPUs, one bfloat16 pass on TPUs).
PEAK_FLOPS = {
    "NVIDIA H200": {"bfloat16": 989e12, "float32": 494e12},
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989e12, "float32": 494e12},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},
}


def peak_flops(device, dtype: str = "bfloat16") -> float | None:
    """The chip's dense peak for matmuls computed in ``dtype`` ("bfloat16" or "float32"), None when unknown (or
    when float32 matmuls are set to a precision above the default, whose peak the table does not hold)."""
    if dtype == "float32" and jax.config.jax_default_matmul_precision not in (None, "default", "bfloat16",
                                                                               "tensorfloat32"):
        return None
    return PEAK_FLOPS.get(device.device_kind, {}).get(dtype)


def train_flops_per_token(num_matmul_params: int, num_layers: int, num_heads: int, head_dim: int,
                          seq_len: int) -> float:
    """6 FLOPs per matmul parameter (forward + backward) plus the causal quadratic mixer core,
    6 * L * H * d * N (half of the 12 L H d N of full attention). A chunked core costs less at long N; the
    estimate keeps one formula so that mixers compare at equal work."""
    return 6.0 * num_matmul_params + 6.0 * num_layers * num_heads * head_dim * seq_len


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricsLogger:
    """Writes metrics of process 0 to ``workdir/metrics.jsonl`` (and TensorBoard) and prints progress lines."""

    def __init__(self, workdir: epath.Path, *, total_steps: int, start_step: int, tokens_per_step: int,
                 flops_per_token: float, dtype: str = "bfloat16", enabled: bool = True, stream=sys.stdout):
        self.enabled, self.stream = enabled, stream
        self.total_steps, self.tokens_per_step, self.flops_per_token = total_steps, tokens_per_step, flops_per_token
        peak = peak_flops(jax.devices()[0], dtype)
        self.peak = peak * jax.device_count() if peak else None
        self.path = workdir / "metrics.jsonl"
        # An object store cannot append: the whole file is written again with each record there.
        self._lines = None if not is_remote(self.path) else []
        self._tensorboard = None
        self.excluded_seconds = 0.0  # evaluations and checkpoint saves so far
        self.start_clock(start_step)
        if not enabled:
            return
        self._truncate_after(start_step)
        try:
            from tensorboardX import SummaryWriter
            self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:
            _logger.warning("metrics: tensorboardX is not installed; writing metrics.jsonl only")

    def start_clock(self, step: int) -> None:
        """Training time counts from now (after compiling), at ``step``."""
        self._mark = (time.perf_counter(), step, self.excluded_seconds)

    @contextlib.contextmanager
    def excluded(self, state=None):
        """Time spent inside is not training time (an evaluation, a checkpoint save). ``state``: the train
        state, waited for first, so the steps still running on the device count as training."""
        if state is not None:
            jax.block_until_ready(state)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.excluded_seconds += time.perf_counter() - started

    def mfu(self, tokens_per_second: float) -> float | None:
        return tokens_per_second * self.flops_per_token / self.peak if self.peak else None

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines past the restored step (written by the run that stopped), so the file is exact."""
        if not self.path.exists():
            return
        lines = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed run
                continue
            if record["step"] <= step:
                lines.append(line)
        self.path.write_text("".join(line + "\n" for line in lines))
        if self._lines is not None:
            self._lines = lines

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: float(v) for k, v in metrics.items()}}
        if self._lines is None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        else:
            self._lines.append(json.dumps(record))
            self.path.write_text("".join(line + "\n" for line in self._lines))
        if self._tensorboard is not None:
            for key, value in metrics.items():
                self._tensorboard.add_scalar(f"{split}/{key}", float(value), step)
            self._tensorboard.flush()

    def progress(self, step: int, metrics: dict) -> dict:
        """Adds tokens/s, MFU and ETA to the train metrics of ``step``, logs them and prints a progress line."""
        now = time.perf_counter()
        then, then_step, then_excluded = self._mark
        self._mark = (now, step, self.excluded_seconds)
        seconds = now - then - (self.excluded_seconds - then_excluded)
        rate = (step - then_step) * self.tokens_per_step / max(seconds, 1e-9)
        metrics = dict(metrics, tokens_per_second=rate)
        if self.peak:
            metrics["mfu"] = self.mfu(rate)
        self.write(step, "train", metrics)
        if self.enabled:
            eta = (self.total_steps - step) * self.tokens_per_step / rate if rate else math.inf
            parts = [f"step {step}/{self.total_steps}", f"loss {metrics['loss']:.4f}"]
            if "accuracy" in metrics:
                parts.append(f"acc {metrics['accuracy']:.3f}")
            parts.append(f"{rate / 1e3:.1f}k tok/s")
            parts.append(f"MFU {100 * metrics['mfu']:.1f}%" if "mfu" in metrics else "MFU n/a")
            parts.append(f"ETA {_duration(eta) if math.isfinite(eta) else '?'}")
            print(" | ".join(parts), file=self.stream, flush=True)
        return metrics

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
