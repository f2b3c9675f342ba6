"""The command lines: a mistake in the config stops ``twomamba-train`` before training with exit code 2 and one line
on stderr naming the key; ``twomamba-plot`` writes beside the runs it draws."""

import json

import pytest

from twomamba_jax.train.cli import plot_main, train_main


def _fails(capsys, tmp_path, *args) -> str:
    """The one stderr line of a failed run (asserting the exit code, and that no work directory was made)."""
    workdir = tmp_path / "run"
    assert train_main(["--workdir", str(workdir), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("twomamba-train: error: "), err
    assert not workdir.exists()
    return err


@pytest.mark.parametrize("args,expected", [
    (["--config", "nosuch"], "--config: expected one of tiny, small, medium or a .py file defining get_config(); "
                             "got 'nosuch'"),
    (["--config.model.bogus=1"], "--config.model.bogus: unknown key 'bogus' in ModelConfig; expected one of "
                                 "['chunk_size', 'head_dim'"),
    (["--config.model.mixer=bogus"], "model.mixer: expected a preset ['2mamba'"),
    (["--config.data.batch_size=0"], "data.batch_size: expected a positive int; got 0"),
    (["--config.data.seq_len=x"], "--config.data.seq_len: expected a int; got 'x'"),
    (["--config.data.tokenizer=spm.model"], "data.tokenizer: 'spm.model' applies to text sources only; "
                                           "data.source='mqar' is a synthetic task"),
    (["--config.data.source=needle", "--config.data.tokenizer=spm.model"], "data.source='needle'"),
    (["--config.optim.learning_rate=nan"], "optim.learning_rate: expected a positive finite number; got nan"),
    (["--config.optim.learning_rate=inf"], "optim.learning_rate: expected a positive finite number; got inf"),
    (["--config.optim.learning_rate=0"], "optim.learning_rate: expected a positive finite number; got 0.0"),
    (["--config.optim.learning_rate=-1e-3"], "optim.learning_rate: expected a positive finite number; got -0.001"),
    (["--config.model.remat_policy=save_attention"], "remat_policy: 'save_attention' applies only with remat=True"),
    (["--config.model.remat=true", "--config.model.remat_policy=some"],
     "remat_policy: expected one of ('full', 'save_attention'); got 'some'"),
])
def test_config_mistakes_are_one_line_naming_the_key(capsys, tmp_path, args, expected):
    assert expected in _fails(capsys, tmp_path, *args)


def test_a_tokenizer_file_that_is_not_sentencepiece_is_named(capsys, tmp_path):
    corpus, not_a_model = tmp_path / "corpus.txt", tmp_path / "not_a_model.txt"
    corpus.write_text("\n\n".join(f"document {i}" for i in range(4)))
    not_a_model.write_text("not a model\n")
    err = _fails(capsys, tmp_path, f"--config.data.source=text:{corpus}", f"--config.data.tokenizer={not_a_model}")
    assert f"data.tokenizer: '{not_a_model}' is not a SentencePiece model file" in err


def test_plot_writes_into_the_first_workdir_unless_told(tmp_path, monkeypatch, capsys):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        records = [{"step": s, "split": "train", "loss": 5.0 / s} for s in (1, 2, 3)]
        records.append({"step": 3, "split": "eval", "loss": 1.5, "perplexity": 4.5, "accuracy": 0.5})
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.chdir(tmp_path / "b")  # not where the default goes
    assert plot_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "b" / "curves.png").exists()
    assert plot_main([str(tmp_path / "b"), "-o", str(tmp_path / "elsewhere.png")]) == 0
    assert (tmp_path / "elsewhere.png").is_file() and not (tmp_path / "b" / "curves.png").exists()
    assert "default: curves.png in the first WORKDIR" in _help(plot_main, capsys)


def _help(main, capsys) -> str:
    with pytest.raises(SystemExit):
        main(["--help"])
    return " ".join(capsys.readouterr().out.split())
