"""Command lines: ``twomamba-train`` (also ``python -m twomamba_jax.train``) and ``twomamba-plot``."""

from __future__ import annotations

import argparse
import logging
import sys

from twomamba_jax.train.config import NAMED_CONFIGS, describe, load_config, override

TRAIN_USAGE = """Train a model; rerunning the same command on the same --workdir resumes from its last checkpoint.

examples:
  twomamba-train --config tiny
  twomamba-train --config tiny --config.model.mixer=softmax --config.steps=300
  twomamba-train --config small --workdir runs/small --config.data.source=tfds:c4/en --config.mesh.fsdp=8
"""


def parse_train_args(argv: list[str]):
    """(config, workdir) from ``--config NAME_OR_PATH [--workdir DIR] [--config.key=value ...]``."""
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
            parser.error(f"{item}: expected --config.KEY=VALUE")
        try:
            config = override(config, key, value)
        except ValueError as error:
            parser.error(str(error))
    workdir = args.workdir or f"runs/{args.config if args.config in NAMED_CONFIGS else 'custom'}"
    return config, workdir


def train_main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config, workdir = parse_train_args(sys.argv[1:] if argv is None else argv)
    from twomamba_jax.train.trainer import train  # after parsing: --help stays fast

    try:
        train(config, workdir)
    except (ValueError, FileNotFoundError, ImportError) as error:  # bad config or data: the message says which
        print(f"twomamba-train: error: {error}", file=sys.stderr)
        return 2
    return 0


def plot_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twomamba-plot", description="Draw the loss (and accuracy) curves of "
                                     "one or more runs into a PNG.")
    parser.add_argument("workdirs", nargs="+", help="work directories of twomamba-train runs")
    parser.add_argument("--output", "-o", default="curves.png", help="the PNG to write (default: curves.png)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from twomamba_jax.train.plot import plot_runs

    try:
        path = plot_runs(args.workdirs, args.output)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"wrote {path}")
    return 0
