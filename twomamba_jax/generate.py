"""Text generation from a ``LanguageModel``: prefill the prompt in one call, then one token per step.

The prompt goes through ``model.step`` as a whole (the mixers' chunked form, leaving the recurrent state or KV
cache behind); every new token is one more ``model.step`` on a cache of fixed size (a constant-size state for
powers 1 and 2 and Mamba-2, a KV cache of ``prompt + max_new_tokens`` slots for softmax and 2Mamba-E), so the
jitted step compiles once, whatever the number of tokens.

    tokens = generate(model, prompt, max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from twomamba_jax.ops.validation import check_segment_ids


def generate(model, prompt, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, on_tokens: Callable[[jax.Array], None] | None = None,
             segment_ids=None):
    """The prompt followed by ``max_new_tokens`` generated tokens: (B, N + max_new_tokens) int32.

    model: a ``LanguageModel``; prompt: (B, N) integer token ids, N >= 1. temperature 0 is greedy (argmax);
    above 0 the logits are divided by it and sampled, after keeping the ``top_k`` most likely tokens and then the
    smallest set whose probability reaches ``top_p`` (either None: no cut). ``seed`` fixes the samples: the same
    seed gives the same tokens. ``on_tokens`` is called with each new (B,) column as soon as it exists (to
    stream text). ``segment_ids``: (B, N) integers, the documents of packed prompt rows (see
    ``LanguageModel.step``): each row continues its last document, which alone the new tokens see.
    """
    prompt = _check(prompt, max_new_tokens, temperature, top_k, top_p)
    batch, length = prompt.shape
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        check_segment_ids(segment_ids, batch, length)
    graphdef, state = nnx.split(model)
    prefill, step = compiled_steps(graphdef, float(temperature), top_k, top_p)
    key = jax.random.key(seed)
    cache = model.init_cache(batch, max_len=length + max_new_tokens)
    token, cache = prefill(state, prompt, cache, jax.random.fold_in(key, 0), segment_ids)
    tokens = [token]
    if on_tokens is not None:
        on_tokens(token)
    for position in range(1, max_new_tokens):
        token, cache = step(state, token, cache, jax.random.fold_in(key, position))
        tokens.append(token)
        if on_tokens is not None:
            on_tokens(token)
    return jnp.concatenate([prompt, jnp.stack(tokens, axis=1)], axis=1)


def _check(prompt, max_new_tokens, temperature, top_k, top_p):
    if not hasattr(prompt, "ndim") or prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(
            prompt.dtype, jnp.integer):
        raise ValueError(f"prompt: expected integer token ids of shape (B, N) with N >= 1; got "
                         f"{getattr(prompt, 'shape', type(prompt).__name__)} {getattr(prompt, 'dtype', '')}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1; got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature: expected a finite number >= 0 (0: greedy); got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected an int >= 1 or None; got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p: expected a number in (0, 1] or None; got {top_p!r}")
    return jnp.asarray(prompt, jnp.int32)


def _sampler(temperature: float, top_k: int | None, top_p: float | None):
    """logits (B, V) float32, key -> token ids (B,) int32."""
    def pick(logits, key):
        if temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if top_p is not None and top_p < 1:
            logits = _nucleus(logits, top_p)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    return pick


def _nucleus(logits, top_p: float):
    """Logits outside the smallest most-likely set whose probability reaches ``top_p`` set to -inf (the most
    likely token always stays)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    before = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1) - jax.nn.softmax(sorted_logits, axis=-1)
    keep_sorted = before < top_p  # the probability of the tokens ahead of this one has not reached top_p yet
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


@functools.cache
def compiled_steps(graphdef, temperature: float, top_k: int | None, top_p: float | None):
    """(prefill, step), jitted: (state, tokens (B, T), cache, key[, segment ids (B, T) or None]) -> (next token
    (B,), cache); kept per model structure and sampler, so later calls reuse the compiled steps."""
    pick = _sampler(temperature, top_k, top_p)

    def advance(state, tokens, cache, key, segment_ids=None):
        logits, cache = nnx.merge(graphdef, state).step(tokens, cache, segment_ids)
        return pick(logits[:, -1].astype(jnp.float32), key), cache

    prefill = jax.jit(advance)
    # The cache is updated in place where buffers can be donated (not on the CPU, which would only warn).
    donate = () if jax.default_backend() == "cpu" else (2,)
    step = jax.jit(lambda state, token, cache, key: advance(state, token[:, None], cache, key), donate_argnums=donate)
    return prefill, step
