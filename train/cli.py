"""Command lines: ``twomamba-train`` (also ``python -m twomamba_jax.train``), ``twomamba-plot``,
``twomamba-generate`` and ``twomamba-eval`` (also ``python -m twomamba_jax.eval``)."""

from __future__ import annotations

import argparse
import logging
import sys

from twomamba_jax.train.config import NAMED_CONFIGS, check, describe, load_config, override

TRAIN_USAGE = """Train a model; rerunning the same command on the same --workdir resumes from its last checkpoint.

examples:
  twomamba-train --config tiny
  twomamba-train --config tiny --config.model.mixer=softmax --config.steps=300
  twomamba-train --config small --workdir runs/small --config.data.source=tfds:c4/en --config.mesh.fsdp=8
"""


def parse_train_args(argv: list[str]):
    """(config, workdir) from ``--config NAME_OR_PATH [--workdir DIR] [--config.key=value ...]``; a bad config
    name, key or value raises ValueError naming it."""
    overrides = [arg for arg in argv if arg.startswith("--config.")]
    parser = argparse.ArgumentParser(
        prog="twomamba-train", description=TRAIN_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (--config.KEY=VALUE; defaults of the tiny config shown):\n"
               + "\n".join(describe(load_config("tiny"))))
    parser.add_argument("--config", default="tiny",
                        help=f"a named config {NAMED_CONFIGS} or a .py file defining get_config() (default: tiny)")
    parser.add_argument("--workdir", default=None,
                        help="checkpoints, metrics.jsonl, tensorboard/ and summary.json (default: runs/CONFIG)")
    args = parser.parse_args([arg for arg in argv if not arg.startswith("--config.")])
    config = load_config(args.config)
    for item in overrides:
        key, sep, value = item[len("--config."):].partition("=")
        if not sep:
            raise ValueError(f"{item}: expected --config.KEY=VALUE")
        config = override(config, key, value)
    check(config)
    workdir = args.workdir or f"runs/{args.config if args.config in NAMED_CONFIGS else 'custom'}"
    return config, workdir


def _error(error: Exception, prog: str = "twomamba-train") -> int:
    """A bad config, data or argument: one line saying which (the traceback would only bury it)."""
    print(f"{prog}: error: " + " ".join(str(error).split()), file=sys.stderr)
    return 2


def train_main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config, workdir = parse_train_args(sys.argv[1:] if argv is None else argv)
    except ValueError as error:
        return _error(error)
    from twomamba_jax.train.trainer import train  # after parsing: --help stays fast

    try:
        train(config, workdir)
    except (ValueError, FileNotFoundError, ImportError) as error:  # bad config or data: the message says which
        return _error(error)
    return 0


def plot_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twomamba-plot", description="Draw the loss (and accuracy) curves of "
                                     "one or more runs into a PNG.")
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="work directories of twomamba-train runs")
    parser.add_argument("--output", "-o", default=None,
                        help="the PNG to write (default: curves.png in the first WORKDIR given)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from twomamba_jax.train.plot import plot_runs
    from twomamba_jax.train.workdir import path as workdir_path

    # Beside the run's metrics, not wherever the command happens to be run from.
    output = args.output if args.output is not None else workdir_path(args.workdirs[0]) / "curves.png"
    try:
        path = plot_runs(args.workdirs, output)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"wrote {path}")
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="twomamba-generate", description="Continue a prompt with the newest checkpoint of a training run, "
        "streaming the text as it is produced (greedy unless --temperature is above 0).")
    parser.add_argument("workdir", metavar="WORKDIR", help="the work directory of a twomamba-train run")
    parser.add_argument("--prompt", required=True,
                        help="the text to continue (a model of a synthetic task: token ids separated by spaces)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sample")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens whose "
                        "probability reaches P")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    import numpy as np

    from twomamba_jax.generate import generate
    from twomamba_jax.train.workdir import load

    try:
        trained = load(args.workdir)
        prompt = _prompt_ids(args.prompt, trained.tokenizer)
        stream = _TextStream(trained.tokenizer, prompt)
        generate(trained.model, prompt[None], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                 on_tokens=lambda token: stream.add(int(np.asarray(token)[0])))
    except ValueError as error:
        return _error(error, "twomamba-generate")
    stream.finish()
    return 0


def _numbers(name: str, text: str | None, kind) -> list | None:
    """A comma-separated list of ``kind`` (None stays None)."""
    if text is None:
        return None
    try:
        return [kind(item) for item in text.split(",")]
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise ValueError(f"{name}: expected comma-separated {noun}; got {text!r}") from None


def _prompt_ids(prompt: str, tokenizer):
    import numpy as np

    if tokenizer is not None:
        ids = tokenizer.encode(prompt)
    else:
        try:
            ids = np.asarray([int(word) for word in prompt.split()], np.int32)
        except ValueError:
            raise ValueError(f"--prompt: this run's model was trained on a synthetic task, so it takes token ids "
                             f"separated by spaces; got {prompt!r}") from None
    if not len(ids):
        raise ValueError("--prompt: expected at least one token; got an empty prompt")
    return ids


class _TextStream:
    """Prints the prompt with the first new token (so a refused request prints nothing), then each piece of text
    as soon as it is final (ids for a synthetic task)."""

    def __init__(self, tokenizer, prompt):
        self._tokenizer, self._ids, self._printed = tokenizer, list(prompt), ""

    def add(self, token: int) -> None:
        self._ids.append(token)
        self._show(final=False)

    def finish(self) -> None:
        self._show(final=True)
        print(flush=True)

    def _show(self, final: bool) -> None:
        if self._tokenizer is None:
            text = " ".join(str(i) for i in self._ids)
        else:
            text = self._tokenizer.decode(self._ids)
            if not final:  # an unfinished multi-byte character decodes as U+FFFD until its last byte comes
                text = text.rstrip("\ufffd")
        if text.startswith(self._printed):  # else wait: a later token changed how earlier pieces join
            print(text[len(self._printed):], end="", flush=True)
            self._printed = text
        elif final:
            print("\n" + text, end="", flush=True)


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="twomamba-eval", description="Evaluate the newest checkpoint of a training run; the results go to "
        "eval_TASK.json and eval_TASK.png in its work directory.")
    parser.add_argument("workdir", metavar="WORKDIR", help="the work directory of a twomamba-train run")
    parser.add_argument("--task", required=True, help="ppl: eval loss and perplexity by context length; decode: "
                        "the decoding state's bytes and decode tokens/s by context length; niah: pass-key "
                        "retrieval by context length and needle depth; mqar: recall by length and key-value pairs")
    parser.add_argument("--lengths", default=None,
                        help="context lengths, comma-separated, e.g. 512,1024,4096 (default: the training length)")
    parser.add_argument("--batches", type=int, default=None, help="ppl: eval batches per length (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=None, help="ppl: rows per batch (default: the run's)")
    parser.add_argument("--steps", type=int, default=32, help="decode: timed decode steps per context length")
    parser.add_argument("--depths", default=None, help="niah: needle depths, comma-separated fractions "
                        "(default: 0,0.25,0.5,0.75,1)")
    parser.add_argument("--trials", type=int, default=4, help="niah: prompts per length and depth")
    parser.add_argument("--kv-pairs", default=None, help="mqar: key-value pair counts, comma-separated (default: "
                        "the run's)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from twomamba_jax.train.evaluate import run

    try:
        lengths = _numbers("--lengths", args.lengths, int)
        run(args.workdir, args.task, lengths=lengths, batches=args.batches, batch_size=args.batch_size,
            steps=args.steps, depths=_numbers("--depths", args.depths, float), trials=args.trials,
            kv_pairs=_numbers("--kv-pairs", args.kv_pairs, int),
            progress=lambda line: print(line, flush=True))
    except ValueError as error:
        return _error(error, "twomamba-eval")
    return 0
