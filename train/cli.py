"""Command lines: ``twomamba-train`` (also ``python -m twomamba_jax.train``) and ``twomamba-plot``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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


def _error(error: Exception) -> int:
    """A bad config or data: one line saying which key or file (the traceback would only bury it)."""
    print("twomamba-train: error: " + " ".join(str(error).split()), file=sys.stderr)
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

    # Beside the run's metrics, not wherever the command happens to be run from.
    output = args.output if args.output is not None else Path(args.workdirs[0]) / "curves.png"
    try:
        path = plot_runs(args.workdirs, output)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"wrote {path}")
    return 0
