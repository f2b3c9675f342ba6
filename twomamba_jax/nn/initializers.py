"""Parameter initialization schemes and the one helper every module uses to make a named, sharded parameter.

``init="torch"`` reproduces the paper's PyTorch defaults: Linear weights and biases U(+-1/sqrt(fan_in)),
depthwise conv weights and biases U(+-1/sqrt(window)), embeddings and the LM head N(0, 0.02).
``init="normal"`` draws every Linear weight, embedding and LM head from N(0, 0.02) with zero biases. Convs keep
U(+-1/sqrt(window)) under both schemes: a N(0, 0.02) depthwise conv would shrink q, k and v fifty-fold, since it
replaces them rather than adding to them. Special parameters (A_log, dt_bias, D) have their own initializers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

INITS = ("torch", "normal")
NORMAL_STD = 0.02

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"init: expected one of {INITS}; got {init!r}")


def symmetric_uniform(bound: float) -> Initializer:
    """U(-bound, bound)."""
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def normal(std: float = NORMAL_STD) -> Initializer:
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def zeros(key, shape, dtype):
    del key
    return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


def log_uniform(low: float, high: float) -> Initializer:
    """``log U[low, high]``: Mamba-2's A_log initialization."""
    return lambda key, shape, dtype: jnp.log(jax.random.uniform(key, shape, jnp.float32, low, high)).astype(dtype)


def linear_weight(init: str, fan_in: int) -> Initializer:
    return symmetric_uniform(1.0 / math.sqrt(fan_in)) if init == "torch" else normal()


def linear_bias(init: str, fan_in: int) -> Initializer:
    return symmetric_uniform(1.0 / math.sqrt(fan_in)) if init == "torch" else zeros


def conv_weight(window: int) -> Initializer:
    return symmetric_uniform(1.0 / math.sqrt(window))


def make_param(
    rngs: nnx.Rngs,
    initializer: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype=jnp.float32,
) -> nnx.Param:
    """A parameter carrying logical axis names (one per dim) for sharding rules to map onto a mesh."""
    if len(axes) != len(shape):
        raise ValueError(f"axes: expected one name per dim of shape {tuple(shape)}; got {tuple(axes)}")
    return nnx.Param(initializer(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)
