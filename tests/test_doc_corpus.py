"""benchmarks/doc_corpus.py: which files become text, in what order, up to the size asked."""

import gzip
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "doc_corpus.py"


def _main(argv):
    sys_argv, sys.argv = sys.argv, [str(SCRIPT), *argv]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = sys_argv


def test_collects_text_files_in_order_and_stops_at_the_size(tmp_path, capsys):
    docs = tmp_path / "doc"
    (docs / "b").mkdir(parents=True)
    (docs / "a").mkdir()
    (docs / "a" / "NEWS").write_text("first news\n")
    (docs / "a" / "copyright").write_text("licence text\n")
    (docs / "a" / "logo.png").write_bytes(b"\x89PNG\r\n")
    (docs / "b" / "changelog.gz").write_bytes(gzip.compress(b"a changelog entry\n" * 100))
    (docs / "b" / "binary").write_bytes(bytes(range(256)) * 4)
    (docs / "c.txt").write_text("never reached\n")
    out = tmp_path / "corpus.txt"
    _main([str(out), "--root", str(docs), "--megabytes", "0.0015"])
    assert out.read_text() == "first news\n\n\n" + "a changelog entry\n" * 100
    assert "2 files" in capsys.readouterr().out


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _main([str(tmp_path / "x.txt"), "--root", str(tmp_path / "missing")])
    assert "--root:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _main([str(tmp_path / "x.txt"), "--root", str(tmp_path), "--megabytes", "0"])
    assert "--megabytes:" in capsys.readouterr().err
