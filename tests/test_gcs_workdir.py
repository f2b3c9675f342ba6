"""A work directory on Cloud Storage (``gs://``), offline: a local GCS emulator (``gcp-storage-emulator``, in
memory, in a thread) serves one bucket to both clients the trainer uses, gcsfs (through ``etils.epath``) for its
files and tensorstore for the checkpoints' arrays. A run stopped after step 3 and resumed computes exactly what an
uninterrupted run in a local directory computes, and every file lands in the bucket: nothing on the work directory
goes through bare ``open`` or ``pathlib``."""

import json
from http import HTTPStatus

import numpy as np
import pytest
from etils import epath
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.server import create_server
from test_train_loop import _records, _small

from twomamba_jax.train.trainer import train


def _with_generation_headers(download):
    """Real GCS names the object's generation in the headers of every media download (``x-goog-generation``); the
    emulator leaves it out, so tensorstore records generation 0 for whatever it reads and later refuses to
    revalidate that cached object ("Malformed StorageGeneration"): a checkpoint that happened to re-read its OCDBT
    manifest failed. This adds the headers as GCS sends them."""

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            stored = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = stored["generation"]
            response["x-goog-metageneration"] = stored["metageneration"]

    return download_with_generation


@pytest.fixture(scope="module")
def emulator():
    """The emulator's URL, its media downloads carrying the object's generation as GCS's do. Its server thread is a
    daemon that is never stopped: TensorBoard's writer (tensorboardX) uploads its event file once more at
    interpreter exit, which must still find the bucket."""
    objects.download = _with_generation_headers(objects.download)  # the JSON API's alt=media GET calls it by name
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


def test_tensorstore_revalidates_what_it_read_from_the_bucket(bucket):
    """What a checkpoint does with its OCDBT manifest: read an object, then read it again on the condition that
    its generation changed."""
    import tensorstore as ts

    ts.KvStore.open({"driver": "gcs", "bucket": "bucket"}).result().write("manifest", b"v1").result()
    store = ts.KvStore.open({"driver": "gcs", "bucket": "bucket"}).result()  # no cache of the write
    first = store.read("manifest").result()
    again = store.read("manifest", if_not_equal=first.stamp.generation).result()
    assert first.value == b"v1" and again.state in ("value", "unspecified")


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
