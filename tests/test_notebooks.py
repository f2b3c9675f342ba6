"""The notebooks are valid nbformat 4.5 and run end to end in a Jupyter kernel (nbclient), at a small size
(``TWOMAMBA_NOTEBOOK_STEPS``), with their outputs checked."""

import math
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("quickstart", "compare_mixers", "decode_memory")
MIXERS = ("softmax", "2mamba", "2mamba-e", "mamba2s", "mamba2")


def _read(name):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _run(name, tmp_path, monkeypatch, steps):
    """(the text the notebook printed or displayed, the number of PNG images it showed)."""
    monkeypatch.setenv("TWOMAMBA_NOTEBOOK_STEPS", str(steps))
    notebook = _read(name)
    NotebookClient(notebook, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "\n".join(output.get("text", "") + output.get("data", {}).get("text/plain", "") for output in outputs)
    return text, sum("image/png" in output.get("data", {}) for output in outputs)


def test_notebooks_are_valid_nbformat_4_5():
    assert sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)
    for name in NAMES:
        notebook = _read(name)
        assert (notebook.nbformat, notebook.nbformat_minor) >= (4, 5), name
        ids = [cell.id for cell in notebook.cells]
        assert len(set(ids)) == len(ids), (name, ids)
        assert all(not cell.get("outputs") for cell in notebook.cells), f"{name}: stored without outputs"
        nbformat.validate(notebook)


def test_quickstart_runs(tmp_path, monkeypatch):
    text, _ = _run("quickstart", tmp_path, monkeypatch, steps=1)
    assert "(2, 512, 256)" in text  # the layer's output shape


@pytest.mark.slow
def test_compare_mixers_trains_and_evaluates_every_mixer(tmp_path, monkeypatch):
    text, images = _run("compare_mixers", tmp_path, monkeypatch, steps=3)
    assert images == 2  # the loss curves and the NIAH heatmaps
    for mixer in MIXERS:
        row = re.search(rf"^ *{re.escape(mixer)}: parameters (\S+), eval loss (\S+), loss at 1024 (\S+), "
                        rf"NIAH accuracy (\S+)$", text, flags=re.M)
        assert row, (mixer, text[-2000:])
        parameters, loss, loss_1024, accuracy = map(float, row.groups())
        assert parameters > 0 and math.isfinite(loss) and math.isfinite(loss_1024) and 0 <= accuracy <= 1


@pytest.mark.slow
def test_decode_memory_compares_state_and_cache(tmp_path, monkeypatch):
    text, images = _run("decode_memory", tmp_path, monkeypatch, steps=4)
    assert images == 2  # memory by context, decode speed by context
    for mixer in MIXERS:
        assert re.search(rf"^ *{re.escape(mixer)}: \d+ bytes at 1024 tokens, as computed from the config$", text,
                         flags=re.M), mixer
    sizes = {mixer: [float(x) for x in re.findall(r"(\S+) MiB", re.search(rf"^ *{re.escape(mixer)}: 1k .*$", text,
                                                                           flags=re.M).group())]
             for mixer in MIXERS}
    assert sizes["2mamba"][0] == sizes["2mamba"][-1]  # a constant state
    assert sizes["softmax"][-1] == pytest.approx(32 * sizes["softmax"][0], rel=0.01)  # a cache that grows with N
