"""benchmarks/scaling.py on the test's CPU devices: rows for each mesh, and the first loss of every mesh equal to
one device's on the same batch."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "scaling.py"


def _module():
    spec = importlib.util.spec_from_file_location("scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_meshes_train_and_agree_with_one_device(capsys):
    rows = _module().main(["--smoke", "--mixers", "2mamba", "--gpus", "1", "2", "--meshes", "data",
                           "fsdp x tensor"])
    assert [row.split(" | ")[2:4] for row in rows] == [["1", "data (1, 1, 1)"], ["2", "data (2, 1, 1)"],
                                                         ["2", "fsdp x tensor (1, 1, 2)"]]
    for row in rows:
        assert float(row.rstrip(" |").split(" | ")[-1]) < 1e-2  # the first loss against one device's
    assert "| size | mixer | GPUs |" in capsys.readouterr().out


def test_bad_device_counts_are_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        _module().main(["--smoke", "--gpus", "99"])
    assert "--gpus: 99 is not between 1 and the" in capsys.readouterr().err
