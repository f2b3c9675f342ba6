"""``python -m twomamba_jax.eval WORKDIR --task ...``: the same as ``twomamba-eval`` (``train/evaluate.py``)."""

import sys

from twomamba_jax.train.cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main())
