"""``python -m twomamba_jax.train``: the same as ``twomamba-train``."""

import sys

from twomamba_jax.train.cli import train_main

sys.exit(train_main())
