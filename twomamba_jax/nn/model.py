"""The Llama-style language model of SPEC section 4, with any mixer."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from twomamba_jax import ops
from twomamba_jax.nn import initializers as inits
from twomamba_jax.nn.attention import AttentionConfig, SoftmaxAttention
from twomamba_jax.nn.layers import RMSNorm, SwiGLU
from twomamba_jax.nn.mamba2 import Mamba2, Mamba2Config
from twomamba_jax.nn.mixer import DecayedAttention, MixerConfig
from twomamba_jax.nn.partitioning import batch_sharded

AnyMixerConfig = MixerConfig | Mamba2Config | AttentionConfig
# What a rematerialized block keeps for its backward (ModelConfig.remat_policy): nothing, or the attention
# kernels' outputs (jax.checkpoint policies).
REMAT_POLICIES = {"full": None, "save_attention": ops.remat.save_attention}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and mixer of a ``LanguageModel``.

    mixer: a ``MixerConfig`` (decayed attention), ``Mamba2Config`` or ``AttentionConfig`` (softmax);
      ``twomamba_jax.presets.mixer_config(name)`` gives the named ones. A Mamba-2 block sizes its heads from
      its own config (expand, head_dim), not from ``num_heads`` / ``head_dim``.
    dtype: compute dtype of the mixers and MLPs (e.g. jnp.bfloat16); param_dtype: parameter dtype (float32
      recommended). The residual stream between blocks is float32 (or wider) whatever the compute dtype.
    remat: recompute each block's activations in the backward instead of storing them (``nnx.remat``).
    remat_policy: with ``remat``, what the backward recomputes: "full" (the whole block) or "save_attention"
      (the block but the attention kernels' forwards, whose outputs and statistics it keeps: about B N H (dv + 1)
      values a layer; ``ops.remat.save_attention``). Blocks without such kernels (e.g. the dense form on CPU)
      recompute fully; on Hopper the Mosaic GPU chunked kernels' outputs are kept under either policy (their
      forwards write through a ref, an effect, and remat keeps what effectful operations return).
    """

    vocab_size: int
    model_dim: int
    num_layers: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    mixer: AnyMixerConfig = MixerConfig()
    init: str = "torch"
    norm_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "full"

    def __post_init__(self):
        for name in ("vocab_size", "model_dim", "num_layers", "num_heads", "head_dim", "mlp_dim"):
            ops.validation.check_positive_int(name, getattr(self, name))
        inits.check_init(self.init)
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy: expected one of {tuple(REMAT_POLICIES)}; got {self.remat_policy!r}")
        if self.remat_policy != "full" and not self.remat:
            raise ValueError(f"remat_policy: {self.remat_policy!r} applies only with remat=True")
        if not isinstance(self.mixer, AnyMixerConfig):
            raise ValueError("mixer: expected a MixerConfig, Mamba2Config or AttentionConfig "
                             f"(see twomamba_jax.presets.mixer_config); got {self.mixer!r}")


def make_mixer(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The sequence mixer that ``config.mixer`` describes, at the model's width."""
    common = dict(init=config.init, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
    mixer = config.mixer
    if isinstance(mixer, Mamba2Config):
        return Mamba2(config.model_dim, mixer, **common)
    cls = SoftmaxAttention if isinstance(mixer, AttentionConfig) else DecayedAttention
    return cls(config.model_dim, config.num_heads, config.head_dim, mixer, **common)


class Block(nnx.Module):
    """``x += mixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=config.norm_eps, param_dtype=config.param_dtype, rngs=rngs)
        self.mixer_norm = RMSNorm(config.model_dim, **norm)
        self.mixer = make_mixer(config, rngs)
        self.mlp_norm = RMSNorm(config.model_dim, **norm)
        self.mlp = SwiGLU(config.model_dim, config.mlp_dim, init=config.init, dtype=config.dtype,
                          param_dtype=config.param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """x: (B, N, M), the float32 residual stream; the mixer and MLP compute in the config's dtype;
        segment_ids: (B, N) document ids for the mixer, or None."""
        x = batch_sharded(x + self.mixer(self.mixer_norm(x), segment_ids).astype(x.dtype))
        return batch_sharded(x + self.mlp(self.mlp_norm(x)).astype(x.dtype))

    def step(self, x: jax.Array, cache, segment_ids: jax.Array | None = None):
        y, cache = self.mixer.step(self.mixer_norm(x), cache, segment_ids)
        x = x + y.astype(x.dtype)
        return x + self.mlp(self.mlp_norm(x)).astype(x.dtype), cache


class LanguageModel(nnx.Module):
    """Decoder-only LM: tokens (B, N) int -> logits (B, N, vocab) float32. Untied embedding and LM head."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = inits.make_param(rngs, inits.normal(), (config.vocab_size, config.model_dim),
                                      ("vocab", "embed"), config.param_dtype)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.model_dim, eps=config.norm_eps, param_dtype=config.param_dtype, rngs=rngs)
        self.lm_head = inits.make_param(rngs, inits.normal(), (config.model_dim, config.vocab_size),
                                        ("embed", "vocab"), config.param_dtype)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens: (B, N) integer ids -> logits (B, N, vocab_size) float32. segment_ids: (B, N) integers, the
        document of each token of packed rows: no token sees an earlier document of its row (every mixer masks
        attention, and stops states and convolutions, at document starts); None: each row is one sequence."""
        x = self._embed(tokens)
        run = lambda block, x, ids: block(x, ids)  # each mixer checks the ids
        apply = nnx.remat(run, policy=REMAT_POLICIES[self.config.remat_policy]) if self.config.remat else run
        for block in self.blocks:
            x = apply(block, x, segment_ids)
        return self._logits(x)

    def init_cache(self, batch_size: int, max_len: int) -> tuple:
        """One decoding cache per block; ``max_len`` bounds the KV caches (softmax, exp)."""
        return tuple(block.mixer.init_cache(batch_size, max_len) for block in self.blocks)

    def step(self, tokens: jax.Array, cache: tuple, segment_ids: jax.Array | None = None) -> tuple[jax.Array, tuple]:
        """Advance over tokens: (B, T) (a prompt, or one token). Returns (logits (B, T, vocab), cache).
        segment_ids: (B, T) integers, the documents of a packed prompt, or None: what the cache holds continues
        into the first document, no token sees an earlier one, and the cache returned holds each row's last
        document alone (generation continues it)."""
        x = self._embed(tokens)
        new_cache = []
        for block, block_cache in zip(self.blocks, cache, strict=True):
            x, block_cache = block.step(x, block_cache, segment_ids)
            new_cache.append(block_cache)
        return self._logits(x), tuple(new_cache)

    def _embed(self, tokens):
        if not hasattr(tokens, "ndim") or tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens: expected an integer array of shape (B, N); got "
                             f"{getattr(tokens, 'shape', type(tokens).__name__)} {getattr(tokens, 'dtype', '')}")
        vocab = self.config.vocab_size
        if not isinstance(tokens, jax.core.Tracer) and tokens.size:
            with jax.ensure_compile_time_eval():  # concrete ids closed over by a jitted function are checked too
                low, high = int(tokens.min()), int(tokens.max())
            if not 0 <= low <= high < vocab:
                raise ValueError(f"tokens: expected ids in [0, {vocab}); got [{low}, {high}]")
        residual_dtype = jnp.promote_types(self.config.dtype, jnp.float32)
        return batch_sharded(jnp.take(self.embed[...], tokens, axis=0).astype(residual_dtype))

    def _logits(self, x):
        x = self.final_norm(x).astype(self.config.dtype)
        return jnp.einsum("bnm,mv->bnv", x, self.lm_head[...].astype(x.dtype), preferred_element_type=jnp.float32)
