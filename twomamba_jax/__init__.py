"""twomamba_jax: the 2Mamba family of sequence models in JAX / Flax NNX."""

import os as _os

__version__ = "0.1.0"

# Installed, pyproject maps the checkout's top-level kernels/, train/ and configs/ into this package. Run from the
# checkout itself (its root on sys.path, e.g. `python -m twomamba_jax.train` there), this directory shadows the
# installed package, so the same folders are found beside it.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "pyproject.toml")) and all(
        _os.path.isfile(_os.path.join(_checkout, name, "__init__.py")) for name in ("kernels", "train", "configs")):
    __path__.append(_checkout)
