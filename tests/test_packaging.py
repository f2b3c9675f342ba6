"""The package installs as the design asks: kernels/, train/ and configs/ live under twomamba_jax only."""

import importlib
import importlib.metadata
import pathlib
import sysconfig


def test_subpackages_are_installed_under_twomamba_jax():
    site_packages = pathlib.Path(sysconfig.get_paths()["purelib"])
    for name in ("kernels", "train", "configs"):
        module = importlib.import_module(f"twomamba_jax.{name}")
        assert module.__file__.endswith(f"{name}/__init__.py")
        assert not (site_packages / name).exists(), f"a bare top-level '{name}' package was installed"
    assert importlib.import_module("twomamba_jax.kernels.chunked").chunked_attention_pallas
    assert importlib.import_module("twomamba_jax.kernels.parallel").parallel_attention_pallas
    assert importlib.import_module("twomamba_jax.configs.tiny").get_config().model.mixer == "2mamba"


def test_core_dependencies_are_light():
    requires = importlib.metadata.requires("twomamba_jax")
    core = sorted(r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requires if "extra ==" not in r)
    assert core == ["flax", "jax", "numpy"]
