"""A work directory on Cloud Storage (``gs://``), offline: a local GCS emulator (``gcp-storage-emulator``, in
memory, in a thread) serves one bucket to both clients the trainer uses, gcsfs (through ``etils.epath``) for its
files and tensorstore for the checkpoints' arrays. A run stopped after step 3 and resumed computes exactly what an
uninterrupted run in a local directory computes, and every file lands in the bucket: nothing on the work directory
goes through bare ``open`` or ``pathlib``."""

import json

import numpy as np
import pytest
from etils import epath
from gcp_storage_emulator.server import create_server
from test_train_loop import _records, _small

from twomamba_jax.train.trainer import train


@pytest.fixture(scope="module")
def emulator():
    """The emulator's URL. Its server thread is a daemon that is never stopped: TensorBoard's writer (tensorboardX)
    uploads its event file once more at interpreter exit, which must still find the bucket. (In a process of its
    own, the emulator answers tensorstore with generations it cannot parse.)"""
    server = create_server("localhost", 0, in_memory=True, default_bucket="bucket")
    server._api.daemon = True
    server.start()
    return f"http://localhost:{server._api._httpd.server_port}"


@pytest.fixture
def bucket(emulator, monkeypatch):
    """``gs://bucket`` on the emulator; the clients find it through the environment (no credentials)."""
    import gcsfs

    for name, value in {"STORAGE_EMULATOR_HOST": emulator, "TENSORSTORE_GCS_HTTP_URL": emulator,
                        "GOOGLE_CLOUD_PROJECT": "test", "FSSPEC_GCS_TOKEN": "anon",
                        # gcsfs otherwise probes the bucket over gRPC (hierarchical namespaces), which the
                        # emulator does not serve, and waits on it.
                        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}.items():
        monkeypatch.setenv(name, value)
    gcsfs.GCSFileSystem.clear_instance_cache()
    yield "gs://bucket"
    gcsfs.GCSFileSystem.clear_instance_cache()


def test_a_run_on_gs_stops_and_resumes_like_a_local_run(bucket, tmp_path):
    config = _small(steps=6)
    local, remote = tmp_path / "local", epath.Path(f"{bucket}/runs/tiny")
    train(config, local)
    train(config, remote, stop_after=3)
    assert train(config, remote)["step"] == 6
    straight, resumed = _records(local), _records(remote)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(straight, resumed):
        np.testing.assert_allclose([b["loss"], b["grad_norm"]], [a["loss"], a["grad_norm"]], rtol=1e-6)
    assert json.loads((remote / "summary.json").read_text())["step"] == 6
    assert sorted(p.name for p in (remote / "checkpoints").iterdir()) == ["3", "6"]

    def kinds(names):  # checkpoint array files and event files are named by content, time and host
        return {name.split("/d/")[0].split("events.out")[0] for name in names}

    in_bucket = [str(directory / name).split("runs/tiny/", 1)[1] for directory, _, names in remote.walk()
                 for name in names]
    assert kinds(in_bucket) == kinds(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
