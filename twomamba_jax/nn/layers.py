"""Small building blocks: RMSNorm, the SwiGLU MLP and the causal depthwise convolution."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from twomamba_jax.nn import initializers as inits
from twomamba_jax.ops.numerics import document_starts


def check_norm_eps(name: str, eps) -> None:
    """A norm epsilon: a positive finite number, or None (the input dtype's machine epsilon)."""
    if eps is None:
        return
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < float("inf")):
        raise ValueError(f"{name}: expected a positive number, or None for the compute dtype's machine epsilon; "
                         f"got {eps!r}")


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * scale`` over the trailing ``len(shape)`` axes, computed in float32.

    shape: the normalized trailing shape, e.g. (M,) or (H, d) (one RMS over all heads); axes: its logical names.
    eps: a positive number, or None for the machine epsilon of the input's dtype (``jnp.finfo(x.dtype).eps``:
    1.19e-7 for float32, 2^-7 for bfloat16), as ``torch.nn.RMSNorm(eps=None)`` does.
    """

    def __init__(self, shape: int | Sequence[int], *, axes: Sequence[str | None] = ("embed",),
                 eps: float | None = 1e-5, param_dtype=jnp.float32, rngs: nnx.Rngs):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        check_norm_eps("eps", eps)
        self.eps = eps
        self.scale = inits.make_param(rngs, inits.ones, shape, axes, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        axes = tuple(range(-self.scale.ndim, 0))
        eps = jnp.finfo(x.dtype).eps if self.eps is None else self.eps
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axes, keepdims=True) + eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class SwiGLU(nnx.Module):
    """``down(silu(x @ gate) * (x @ up))``: (B, N, M) -> (B, N, M), hidden width ``mlp_dim``."""

    def __init__(self, model_dim: int, mlp_dim: int, *, init: str = "torch", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        inits.check_init(init)
        self.dtype = dtype
        self.gate = inits.make_param(rngs, inits.linear_weight(init, model_dim), (model_dim, mlp_dim),
                                     ("embed", "mlp"), param_dtype)
        self.up = inits.make_param(rngs, inits.linear_weight(init, model_dim), (model_dim, mlp_dim),
                                   ("embed", "mlp"), param_dtype)
        self.down = inits.make_param(rngs, inits.linear_weight(init, mlp_dim), (mlp_dim, model_dim),
                                     ("mlp", "embed"), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        hidden = jax.nn.silu(x @ self.gate[...].astype(self.dtype)) * (x @ self.up[...].astype(self.dtype))
        return hidden @ self.down[...].astype(self.dtype)


class CausalConv(nnx.Module):
    """Depthwise causal convolution over time, ``u_t = b + sum_{s<w} K[s] * p_{t-s}``, one filter per channel.

    Channels may have any shape (e.g. (3, H, d) for fused q/k/v), named by ``channel_axes`` for sharding.
    """

    def __init__(self, window: int, channel_shape: Sequence[int], channel_axes: Sequence[str | None], *,
                 use_bias: bool = True, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.window = window
        self.kernel = inits.make_param(rngs, inits.conv_weight(window), (window, *channel_shape),
                                       ("conv", *channel_axes), param_dtype)
        self.bias = (inits.make_param(rngs, inits.conv_weight(window), tuple(channel_shape), channel_axes,
                                      param_dtype) if use_bias else None)

    def init_history(self, batch_size: int, dtype) -> jax.Array:
        """Zero history (B, w - 1, *channels): the conv sees zeros before the first token."""
        return jnp.zeros((batch_size, self.window - 1, *self.kernel.shape[1:]), dtype)

    def __call__(self, x: jax.Array, history: jax.Array | None = None, segment_ids: jax.Array | None = None, *,
                 part: int | None = None) -> tuple[jax.Array, jax.Array]:
        """x: (B, T, *channels); history: the w - 1 inputs before x (None = zeros); segment_ids: (B, T) integers,
        the document of each token (a new one wherever the id changes): no tap reaches an earlier document (the
        history counts as the first token's). ``part``: x (and history) hold only channels[0] slice ``part``,
        (B, T, *channels[1:]), e.g. q of fused q/k/v: convolving the parts one by one writes each straight into
        its own array, where slicing a convolved fused array copies it once more (and XLA's gradient of the
        fused filter reduced over a slice ran ~0.5 ms a layer of the small LM on the H200).

        Returns (u (B, T, *channels) or that part, the new history: the last w - 1 inputs, those of documents
        before the last one zeroed, so that the next call continues the last document alone).
        """
        kernel, bias = self.kernel[...], None if self.bias is None else self.bias[...]
        if part is not None:
            kernel, bias = kernel[:, part], None if bias is None else bias[part]
        if history is None:
            history = jnp.zeros((x.shape[0], self.window - 1, *x.shape[2:]), x.dtype)
        padded = jnp.concatenate([history.astype(x.dtype), x], axis=1)
        length = x.shape[1]
        kernel = kernel.astype(x.dtype)
        offset = self.window - 1
        taps = [padded[:, offset - s: offset - s + length] for s in range(self.window)]
        if segment_ids is not None:
            # Tap s of token t reads token t - s, which belongs to t's document if no document starts in between
            # (the history, padded with 0, counts as the first document).
            document = jnp.pad(jnp.cumsum(document_starts(segment_ids), axis=1), ((0, 0), (offset, 0)))
            for s in range(1, self.window):
                same = document[:, offset - s: offset - s + length] == document[:, offset:]
                taps[s] = jnp.where(same.reshape(same.shape + (1,) * (x.ndim - 2)), taps[s], 0)
        u = sum(kernel[s] * tap for s, tap in enumerate(taps))
        if bias is not None:
            u = u + bias.astype(x.dtype)
        history = padded[:, padded.shape[1] - offset:]
        if segment_ids is not None:
            last = document[:, document.shape[1] - offset:] == document[:, -1:]
            history = jnp.where(last.reshape(last.shape + (1,) * (x.ndim - 2)), history, 0)
        return u, history


def check_model_input(x, model_dim: int) -> None:
    """Module inputs are (B, N, M) floating arrays with M = model_dim."""
    if not hasattr(x, "ndim") or x.ndim != 3 or x.shape[-1] != model_dim or x.shape[1] == 0:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"x: expected shape (B, N, {model_dim}) with N >= 1; got {shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x: expected a floating-point array; got dtype {x.dtype}")
