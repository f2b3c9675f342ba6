"""Multi-process training on CPU: processes on localhost joined by jax.distributed.initialize (gloo collectives),
with FSDP and tensor axes spanning processes, give the losses of one process on as many devices, and a SIGTERM to
one of them stops all at the same step, from which the same command resumes (exactly, as one process does: the
records match the uninterrupted run's to float32 noise, which any lost or repeated step would exceed)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

STEPS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _command(workdir, processes=1, process_id=0, port=0):
    command = [sys.executable, "-m", "twomamba_jax.train", "--config", "tiny", "--workdir", str(workdir),
               f"--config.steps={STEPS}", "--config.log_every=1", "--config.optim.warmup_steps=2",
               "--config.data.seq_len=32", "--config.data.num_kv_pairs=4", "--config.data.batch_size=8",
               "--config.eval.every=8", "--config.eval.batches=1", "--config.checkpoint.every=4",
               "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    if processes > 1:
        command += [f"--config.mesh.num_processes={processes}", f"--config.mesh.process_id={process_id}",
                    f"--config.mesh.coordinator_address=localhost:{port}"]
    return command


def _launch(workdir, processes, devices_each, stop_at_step=None):
    """Runs ``processes`` processes of ``devices_each`` CPU devices; with ``stop_at_step``, SIGTERM goes to the
    last process once process 0 has logged that step. Returns process 0's output. The launches share a
    compilation cache (beside the work directories), so a resumed run does not compile again."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}",
           "PYTHONUNBUFFERED": "1", "JAX_COMPILATION_CACHE_DIR": str(workdir.parent / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    port = _free_port()
    logs = [open(f"{workdir}.{i}.log", "w") for i in range(processes)]
    runs = [subprocess.Popen(_command(workdir, processes, i, port), stdout=subprocess.PIPE, stderr=log,
                             text=True, env=env) for i, log in enumerate(logs)]
    lines = []
    for line in runs[0].stdout:
        lines.append(line)
        if stop_at_step is not None and line.startswith(f"step {stop_at_step}/"):
            runs[-1].send_signal(15)
    for run, log in zip(runs, logs):
        code = run.wait(timeout=300)
        log.close()
        assert code == 0, open(log.name).read()[-3000:]
    for run in runs[1:]:
        run.stdout.read()
    return "".join(lines)


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _numbers(records):
    """(step, split) of every record, and its loss, gradient norm and accuracy."""
    keys = [(r["step"], r["split"]) for r in records]
    return keys, np.asarray([(r["loss"], r.get("grad_norm", 0.0), r["accuracy"]) for r in records])


def _assert_close(got, expected):
    """The same records; the numbers to float32 noise (the reductions over processes sum in another order)."""
    assert got[0] == expected[0]
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_processes_train_like_one_and_resume_across_processes(tmp_path):
    single = tmp_path / "single"
    _launch(single, processes=1, devices_each=4)
    expected = _numbers(_records(single))
    assert [key for key in expected[0] if key[1] == "train"] == [(step, "train") for step in range(1, STEPS + 1)]

    two = tmp_path / "two"
    output = _launch(two, processes=2, devices_each=2)
    assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 2}, 4 cpu device(s)" in output
    _assert_close(_numbers(_records(two)), expected)

    stopped = tmp_path / "four"
    output = _launch(stopped, processes=4, devices_each=1, stop_at_step=3)
    stops = [line for line in output.splitlines() if line.startswith("stopped at step")]
    assert stops and int(stops[0].split()[3].rstrip(";")) < STEPS, output
    output = _launch(stopped, processes=4, devices_each=1)
    assert "resuming at step" in output and f"done: step {STEPS}/{STEPS}" in output
    _assert_close(_numbers(_records(stopped)), expected)  # no step lost or repeated across the stop
