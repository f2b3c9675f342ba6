"""The configurable decayed-attention mixer of SPEC section 1: linear attention, Mamba-2S, 2Mamba and 2Mamba-E.

Every ablation of the paper is one ``MixerConfig``; ``twomamba_jax.presets`` names them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from twomamba_jax import ops
from twomamba_jax.nn import initializers as inits
from twomamba_jax.nn.layers import CausalConv, RMSNorm, check_model_input, check_norm_eps
from twomamba_jax.nn.partitioning import per_head
from twomamba_jax.ops.validation import check_power, check_segment_ids

NORMS = ("softmax", "output")
DECAYS = ("none", "original", "softplus")
ACTIVATIONS = (None, "relu", "silu")
_ACTIVATION_FNS = {None: lambda x: x, "relu": jax.nn.relu, "silu": jax.nn.silu}


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """Flags of the decayed-attention mixer. The defaults are 2Mamba (SPEC Algorithm 5).

    power: 1, 2 or "exp" (f(s) = s, s^2, exp(s)).
    norm: "softmax" (divide by the sum of weights) or "output" (RMSNorm over all heads after the mix).
    conv_window: causal depthwise conv over the fused q/k/v channels, 0 for none.
    conv_activation: None or "silu" after the conv (on q, k and v).
    decay: "none", "original" (Mamba-2's -exp(A_log) * dt) or "softplus" (-softplus(x @ W_A)).
    d_residual: add ``v * D`` (v after the conv, before dt).
    z_gate: multiply by ``silu(x @ W_z + b_z)``.
    dt_on_values: ``v <- v * dt`` with ``dt = softplus(x @ W_dt)``.
    qk_activation: None, "relu" or "silu" on q and k (never v).
    norm_eps: epsilon of the output RMSNorm; None (the default) is the machine epsilon of the compute dtype, as the
      paper's ``torch.nn.RMSNorm(H * d)`` with no eps (1.19e-7 in float32, 2^-7 in bfloat16).
    chunk_size, impl: passed to ``twomamba_jax.ops.decayed_attention``.
    """

    power: int | str = 2
    norm: str = "softmax"
    conv_window: int = 2
    conv_activation: str | None = None
    decay: str = "softplus"
    d_residual: bool = False
    z_gate: bool = False
    dt_on_values: bool = False
    qk_activation: str | None = None
    norm_eps: float | None = None
    chunk_size: int = ops.DEFAULT_CHUNK_SIZE
    impl: str = "auto"

    def __post_init__(self):
        check_power(self.power)
        if self.norm not in NORMS:
            raise ValueError(f"norm: expected one of {NORMS}; got {self.norm!r}")
        if isinstance(self.conv_window, bool) or not isinstance(self.conv_window, int) or self.conv_window < 0:
            raise ValueError(f"conv_window: expected a non-negative integer (0 = no conv); got {self.conv_window!r}")
        if self.conv_activation not in (None, "silu"):
            raise ValueError(f"conv_activation: expected None or 'silu'; got {self.conv_activation!r}")
        if self.decay not in DECAYS:
            raise ValueError(f"decay: expected one of {DECAYS}; got {self.decay!r}")
        if self.qk_activation not in ACTIVATIONS:
            raise ValueError(f"qk_activation: expected one of {ACTIVATIONS}; got {self.qk_activation!r}")
        if self.power == 1 and self.norm == "softmax" and self.qk_activation != "relu":
            raise ValueError(
                "qk_activation: power=1 with norm='softmax' divides by a sum of q.k weights that must be >= 0; "
                f"expected 'relu'; got {self.qk_activation!r}"
            )
        if self.power == "exp" and self.norm == "output":
            raise ValueError("norm: power='exp' needs norm='softmax'; unnormalized exp(s) weights overflow")
        check_norm_eps("norm_eps", self.norm_eps)
        if self.impl not in ops.IMPLS:
            raise ValueError(f"impl: expected one of {ops.IMPLS}; got {self.impl!r}")
        ops.validation.check_positive_int("chunk_size", self.chunk_size)

    @property
    def needs_dt(self) -> bool:
        return self.dt_on_values or self.decay == "original"


class MixerCache(NamedTuple):
    """Decoding state of one mixer: conv history (B, w - 1, 3, H, d) or None, and the attention state."""

    conv: jax.Array | None
    attention: ops.AttentionState


class DecayedAttention(nnx.Module):
    """The mixer of SPEC section 1: (B, N, M) -> (B, N, M), ``num_heads`` heads of size ``head_dim``."""

    def __init__(self, model_dim: int, num_heads: int, head_dim: int, config: MixerConfig = MixerConfig(), *,
                 init: str = "torch", dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        inits.check_init(init)
        for name, value in (("model_dim", model_dim), ("num_heads", num_heads), ("head_dim", head_dim)):
            ops.validation.check_positive_int(name, value)
        self.config = config
        self.model_dim, self.num_heads, self.head_dim, self.dtype = model_dim, num_heads, head_dim, dtype
        heads = ("heads", "head_dim")
        embed_weight = inits.linear_weight(init, model_dim)

        self.qkv = inits.make_param(rngs, embed_weight, (model_dim, 3, num_heads, head_dim),
                                    ("embed", None, *heads), param_dtype)
        self.conv = (CausalConv(config.conv_window, (3, num_heads, head_dim), (None, *heads),
                                param_dtype=param_dtype, rngs=rngs) if config.conv_window else None)
        self.dt_proj = (inits.make_param(rngs, embed_weight, (model_dim, num_heads), ("embed", "heads"), param_dtype)
                        if config.needs_dt else None)
        self.A_log = (inits.make_param(rngs, inits.log_uniform(1.0, 16.0), (num_heads,), ("heads",), param_dtype)
                      if config.decay == "original" else None)
        self.decay_proj = (inits.make_param(rngs, embed_weight, (model_dim, num_heads), ("embed", "heads"),
                                            param_dtype) if config.decay == "softplus" else None)
        self.D = (inits.make_param(rngs, inits.ones, (num_heads, head_dim), heads, param_dtype)
                  if config.d_residual else None)
        if config.z_gate:
            self.z_proj = inits.make_param(rngs, embed_weight, (model_dim, num_heads, head_dim), ("embed", *heads),
                                           param_dtype)
            self.z_bias = inits.make_param(rngs, inits.linear_bias(init, model_dim), (num_heads, head_dim), heads,
                                           param_dtype)
        else:
            self.z_proj = self.z_bias = None
        self.out_norm = (RMSNorm((num_heads, head_dim), axes=heads, eps=config.norm_eps, param_dtype=param_dtype,
                                 rngs=rngs)
                         if config.norm == "output" else None)
        self.out = inits.make_param(rngs, inits.linear_weight(init, num_heads * head_dim),
                                    (num_heads, head_dim, model_dim), (*heads, "embed"), param_dtype)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """x: (B, N, M) -> (B, N, M). segment_ids: (B, N) integers, the document of each token of packed rows (a
        new one wherever the id changes): nothing of an earlier document reaches a token, through the attention
        core (``ops.decayed_attention(segment_ids=...)``) or the conv."""
        return self._mix(x, cache=None, segment_ids=segment_ids)[0]

    def init_cache(self, batch_size: int, max_len: int) -> MixerCache:
        """Empty decoding state; ``max_len`` bounds the KV cache of power "exp" (other powers keep a fixed state)."""
        conv = self.conv.init_history(batch_size, self.dtype) if self.conv is not None else None
        attention = ops.init_state(batch_size, self.num_heads, self.head_dim, self.head_dim,
                                   power=self.config.power, normalize=self._normalize, max_len=max_len,
                                   dtype=self.dtype)
        return MixerCache(conv=conv, attention=attention)

    def step(self, x: jax.Array, cache: MixerCache, segment_ids: jax.Array | None = None
             ) -> tuple[jax.Array, MixerCache]:
        """Advance the cache over x: (B, T, M), T >= 1 (a prompt to prefill, or one token). Returns (y, cache).
        segment_ids: (B, T) integers, the documents of a packed prompt, or None: the cache continues the first
        one, no token sees an earlier document, and the cache returned holds the last document alone."""
        return self._mix(x, cache=cache, segment_ids=segment_ids)

    @property
    def _normalize(self):
        return "softmax" if self.config.norm == "softmax" else None

    def _mix(self, x, cache: MixerCache | None, segment_ids=None):
        check_model_input(x, self.model_dim)
        if segment_ids is not None:
            check_segment_ids(segment_ids, *x.shape[:2])
        cfg, dtype = self.config, self.dtype
        x = x.astype(dtype)
        p = jnp.einsum("bnm,mshd->bnshd", x, self.qkv[...].astype(dtype))
        q, k, v = p[:, :, 0], p[:, :, 1], p[:, :, 2]
        conv_history = None
        if self.conv is not None:  # q, k and v each by their own filters (see CausalConv's part)
            history = (None,) * 3 if cache is None else (cache.conv[:, :, i] for i in range(3))
            (q, k, v), histories = zip(*(self.conv(u, h, segment_ids, part=i)
                                         for i, (u, h) in enumerate(zip((q, k, v), history))))
            conv_history = None if cache is None else jnp.stack(histories, axis=2)
            if cfg.conv_activation == "silu":
                q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)

        # Decays and dt in float32 (or wider) whatever the compute dtype (SPEC section 2, numerics).
        f32 = jnp.promote_types(dtype, jnp.float32)
        x32 = x.astype(f32)
        dt = jax.nn.softplus(x32 @ self.dt_proj[...].astype(f32)) if cfg.needs_dt else None
        if cfg.decay == "original":
            log_decay = -jnp.exp(self.A_log[...].astype(f32)) * dt
        elif cfg.decay == "softplus":
            log_decay = -jax.nn.softplus(x32 @ self.decay_proj[...].astype(f32))
        else:
            log_decay = None
        residual = v * self.D[...].astype(dtype) if cfg.d_residual else None
        if cfg.dt_on_values:
            v = v * dt[..., None].astype(dtype)
        act = _ACTIVATION_FNS[cfg.qk_activation]
        q, k = act(q), act(k)

        kwargs = dict(power=cfg.power, normalize=self._normalize)
        if cache is None:
            core = functools.partial(ops.decayed_attention, chunk_size=cfg.chunk_size, impl=cfg.impl, **kwargs)
            if log_decay is None:
                y = per_head(core, q, k, v, segment_ids=segment_ids)
            else:
                y = per_head(core, q, k, v, log_decay, segment_ids=segment_ids)
            state = None
        elif x.shape[1] == 1:
            y, state = ops.decayed_attention_step(q[:, 0], k[:, 0], v[:, 0],
                                                  None if log_decay is None else log_decay[:, 0],
                                                  cache.attention, **kwargs)
            y = y[:, None]
        else:
            y, state = ops.decayed_attention(q, k, v, log_decay, chunk_size=cfg.chunk_size, impl=cfg.impl,
                                             initial_state=cache.attention, return_state=True,
                                             segment_ids=segment_ids, **kwargs)

        if residual is not None:
            y = y + residual
        if cfg.z_gate:
            z = jnp.einsum("bnm,mhd->bnhd", x, self.z_proj[...].astype(dtype)) + self.z_bias[...].astype(dtype)
            y = y * jax.nn.silu(z)
        if self.out_norm is not None:
            y = self.out_norm(y)
        out = jnp.einsum("bnhd,hdm->bnm", y.astype(dtype), self.out[...].astype(dtype))
        return out, MixerCache(conv=conv_history, attention=state)

