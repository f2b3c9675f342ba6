"""The Mamba-2 block (SPEC section 3), following the official module; its SSD core is power-1 decayed attention."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from twomamba_jax import ops
from twomamba_jax.nn import initializers as inits
from twomamba_jax.nn.layers import CausalConv, check_model_input
from twomamba_jax.nn.partitioning import per_head


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """Mamba-2 hyper-parameters; defaults are the official module's (full multi-head block).

    d_ssm: width of the SSM branch (default ``expand * model_dim``); when smaller than ``expand * model_dim``
      the rest is a gated-MLP branch ``silu(z0) * x0`` beside it, as in the official module.
    d_has_hdim: D per channel (H, headdim) instead of per head (H,).
    """

    expand: int = 2
    head_dim: int = 64
    d_state: int = 128
    num_groups: int = 1
    conv_window: int = 4
    conv_bias: bool = True
    d_ssm: int | None = None
    d_has_hdim: bool = False
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)
    norm_eps: float = 1e-5
    chunk_size: int = ops.DEFAULT_CHUNK_SIZE
    impl: str = "auto"

    def __post_init__(self):
        for name in ("expand", "head_dim", "d_state", "num_groups", "conv_window", "chunk_size"):
            ops.validation.check_positive_int(name, getattr(self, name))
        if self.d_ssm is not None:
            ops.validation.check_positive_int("d_ssm", self.d_ssm)
        if self.impl not in ops.IMPLS:
            raise ValueError(f"impl: expected one of {ops.IMPLS}; got {self.impl!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max; got {self.dt_min}, {self.dt_max}")


class Mamba2Cache(NamedTuple):
    """Conv history (B, w - 1, d_ssm + 2 G n) and the SSM state (a power-1 RecurrentState)."""

    conv: jax.Array
    ssm: ops.RecurrentState


def ssd(x, dt, A, B, C, *, chunk_size=ops.DEFAULT_CHUNK_SIZE, impl="auto", initial_state=None, return_state=False,
        segment_ids=None):
    """Mamba-2's SSD: ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t`` (no D, no gate).

    x: (B, N, H, p); dt: (B, N, H) > 0; A: (H,) < 0; B, C: (B, N, G, n) with G dividing H.
    It is decayed attention with power 1, queries C, keys B, values x * dt, log-decay A * dt and scale 1.
    segment_ids: (B, N) document ids of packed rows (the state restarts at each document), or None.
    Returns y (B, N, H, p), or (y, RecurrentState) with ``return_state``.
    """
    heads, groups = x.shape[2], B.shape[2]
    if heads % groups:
        raise ValueError(f"B: expected a group count dividing the {heads} heads of x; got {groups} groups")
    keys = jnp.repeat(B, heads // groups, axis=2)
    queries = jnp.repeat(C, heads // groups, axis=2)
    values = x * dt[..., None].astype(x.dtype)
    decay_dtype = jnp.promote_types(dt.dtype, jnp.float32)
    log_decay = A.astype(decay_dtype) * dt.astype(decay_dtype)
    core = functools.partial(ops.decayed_attention, power=1, normalize=None, scale=1.0, chunk_size=chunk_size,
                             impl=impl, initial_state=initial_state, return_state=return_state)
    if initial_state is None and not return_state:  # the training path: per head under a mesh
        return per_head(core, queries, keys, values, log_decay, segment_ids=segment_ids)
    return core(queries, keys, values, log_decay, segment_ids=segment_ids)


class Mamba2(nnx.Module):
    """(B, N, M) -> (B, N, M): in_proj, conv + SiLU, SSD, D skip, gated RMSNorm, out_proj."""

    def __init__(self, model_dim: int, config: Mamba2Config = Mamba2Config(), *, init: str = "torch",
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        inits.check_init(init)
        ops.validation.check_positive_int("model_dim", model_dim)
        cfg = self.config = config
        self.model_dim, self.dtype = model_dim, dtype
        d_inner = cfg.expand * model_dim
        d_ssm = self.d_ssm = cfg.d_ssm or d_inner
        if d_ssm > d_inner or d_ssm % cfg.head_dim:
            raise ValueError(f"d_ssm: expected a multiple of head_dim={cfg.head_dim} and at most "
                             f"expand * model_dim = {d_inner}; got {d_ssm}")
        self.num_heads = d_ssm // cfg.head_dim
        if self.num_heads % cfg.num_groups:
            raise ValueError(f"num_groups: expected a divisor of the {self.num_heads} heads; got {cfg.num_groups}")
        self.d_mlp = d_inner - d_ssm
        conv_dim = d_ssm + 2 * cfg.num_groups * cfg.d_state
        in_dim = 2 * self.d_mlp + d_ssm + conv_dim + self.num_heads

        # One fused projection, as in the official module: [z0, x0 | z | xBC | dt].
        self.in_proj = inits.make_param(rngs, inits.linear_weight(init, model_dim), (model_dim, in_dim),
                                        ("embed", "mlp"), param_dtype)
        self.conv = CausalConv(cfg.conv_window, (conv_dim,), ("mlp",), use_bias=cfg.conv_bias,
                               param_dtype=param_dtype, rngs=rngs)
        self.dt_bias = inits.make_param(rngs, _dt_bias_init(cfg), (self.num_heads,), ("heads",), param_dtype)
        self.A_log = inits.make_param(rngs, inits.log_uniform(*cfg.A_init_range), (self.num_heads,), ("heads",),
                                      param_dtype)
        d_shape, d_axes = ((self.num_heads, cfg.head_dim), ("heads", "head_dim")) if cfg.d_has_hdim else (
            (self.num_heads,), ("heads",))
        self.D = inits.make_param(rngs, inits.ones, d_shape, d_axes, param_dtype)
        self.norm_scale = inits.make_param(rngs, inits.ones, (self.num_heads, cfg.head_dim), ("heads", "head_dim"),
                                           param_dtype)
        self.out_proj = inits.make_param(rngs, inits.linear_weight(init, d_inner), (d_inner, model_dim),
                                         ("mlp", "embed"), param_dtype)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """x: (B, N, M) -> (B, N, M). segment_ids: (B, N) integers, the document of each token of packed rows (no
        state or convolution tap carries across a document start), or None."""
        return self._forward(x, cache=None, segment_ids=segment_ids)[0]

    def init_cache(self, batch_size: int, max_len: int) -> Mamba2Cache:
        """Empty decoding state (``max_len`` is unused: the SSM state has a fixed size)."""
        del max_len
        cfg = self.config
        return Mamba2Cache(
            conv=self.conv.init_history(batch_size, self.dtype),
            ssm=ops.init_state(batch_size, self.num_heads, cfg.d_state, cfg.head_dim, power=1, normalize=None,
                               dtype=self.dtype),
        )

    def step(self, x: jax.Array, cache: Mamba2Cache, segment_ids: jax.Array | None = None
             ) -> tuple[jax.Array, Mamba2Cache]:
        """Advance over x: (B, T, M), T >= 1. Returns (y (B, T, M), cache). segment_ids: (B, T) integers, the
        documents of a packed prompt, or None: the cache continues the first one, no token sees an earlier
        document, and the cache returned holds the last document alone."""
        return self._forward(x, cache=cache, segment_ids=segment_ids)

    def _forward(self, x, cache: Mamba2Cache | None, segment_ids=None):
        check_model_input(x, self.model_dim)
        if segment_ids is not None:
            ops.validation.check_segment_ids(segment_ids, *x.shape[:2])
        cfg, dtype = self.config, self.dtype
        batch, length, _ = x.shape
        x = x.astype(dtype)
        proj = x @ self.in_proj[...].astype(dtype)
        sizes = [self.d_mlp, self.d_mlp, self.d_ssm, self.conv.kernel.shape[-1]]
        z0, x0, z, xbc, dt_raw = jnp.split(proj, list(_cumulative(sizes)), axis=-1)
        xbc, conv_history = self.conv(xbc, None if cache is None else cache.conv, segment_ids)
        xbc = jax.nn.silu(xbc)
        group_width = cfg.num_groups * cfg.d_state
        xs, B, C = jnp.split(xbc, [self.d_ssm, self.d_ssm + group_width], axis=-1)
        xs = xs.reshape(batch, length, self.num_heads, cfg.head_dim)
        B = B.reshape(batch, length, cfg.num_groups, cfg.d_state)
        C = C.reshape(batch, length, cfg.num_groups, cfg.d_state)
        f32 = jnp.promote_types(dtype, jnp.float32)  # decays in float32 at least
        dt = jax.nn.softplus(dt_raw.astype(f32) + self.dt_bias[...].astype(f32))
        A = -jnp.exp(self.A_log[...].astype(f32))

        common = dict(chunk_size=cfg.chunk_size, impl=cfg.impl)
        if cache is None:
            y, state = ssd(xs, dt, A, B, C, segment_ids=segment_ids, **common), None
        else:
            y, state = ssd(xs, dt, A, B, C, initial_state=cache.ssm, return_state=True, segment_ids=segment_ids,
                           **common)
        D = self.D[...].astype(dtype)
        y = y + xs * (D if cfg.d_has_hdim else D[:, None])

        # Gated RMSNorm (norm after the gate), one RMS per group of heads.
        gated = (y * jax.nn.silu(z.reshape(y.shape))).astype(f32)
        grouped = gated.reshape(batch, length, cfg.num_groups, -1)
        grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped**2, axis=-1, keepdims=True) + cfg.norm_eps)
        y = grouped.reshape(y.shape) * self.norm_scale[...].astype(f32)
        y = y.reshape(batch, length, self.d_ssm).astype(dtype)
        if self.d_mlp:
            y = jnp.concatenate([jax.nn.silu(z0) * x0, y], axis=-1)
        out = y @ self.out_proj[...].astype(dtype)
        return out, (None if cache is None else Mamba2Cache(conv=conv_history, ssm=state))


def _cumulative(sizes):
    total = 0
    for size in sizes:
        total += size
        yield total


def _dt_bias_init(cfg: Mamba2Config) -> inits.Initializer:
    """dt_bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], floored at dt_floor."""

    def init(key, shape, dtype):
        log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(cfg.dt_min), math.log(cfg.dt_max))
        dt = jnp.maximum(jnp.exp(log_dt), cfg.dt_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init
