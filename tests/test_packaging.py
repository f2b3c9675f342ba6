"""The package installs as the design asks: kernels/, train/ and configs/ live under twomamba_jax only."""

import importlib
import importlib.metadata


def test_subpackages_are_installed_under_twomamba_jax():
    for name in ("kernels", "train", "configs"):
        module = importlib.import_module(f"twomamba_jax.{name}")
        assert module.__file__.endswith(f"{name}/__init__.py")
    files = [str(f) for f in importlib.metadata.files("twomamba_jax")]
    assert not [f for f in files if f.split("/")[0] in ("kernels", "train", "configs")]


def test_core_dependencies_are_light():
    requires = importlib.metadata.requires("twomamba_jax")
    core = sorted(r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requires if "extra ==" not in r)
    assert core == ["flax", "jax", "numpy"]
