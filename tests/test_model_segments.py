"""Document masking at the model level: ``LanguageModel(tokens, segment_ids)`` on packed rows gives, document by
document, the logits and parameter gradients of each document run alone, for the decayed mixers, softmax
attention (a segment mask) and Mamba-2 (its conv and SSD stopped at document starts); float64 parameters, 1e-6
(the RMSNorms compute in float32). The trainer masks packed text by default (``data.cross_document=false``)."""

import jax.numpy as jnp
import pytest
from flax import nnx
from helpers import each_document_alone, rel_error, segment_ids

from twomamba_jax import nn, presets

# Row 0: documents of 3, 1, 8 and 12 tokens; row 1: one document.
STARTS = [(0, 3, 4, 12), (0,)]
LENGTH, VOCAB, TOLERANCE = 24, 40, 1e-6


@pytest.mark.parametrize("mixer", ["2mamba", "2mamba-e", "softmax", "mamba2"])
def test_packed_rows_equal_each_document_alone(rng, mixer):
    config = presets.model_config("tiny", mixer=mixer, vocab_size=VOCAB, num_layers=1, dtype=jnp.float64,
                                  param_dtype=jnp.float64)
    model = nn.LanguageModel(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(rng.integers(0, VOCAB, (len(STARTS), LENGTH)))
    cotangent = jnp.asarray(rng.standard_normal((len(STARTS), LENGTH, VOCAB)))
    packed = lambda model: model(tokens, segment_ids=segment_ids(STARTS, LENGTH))
    alone = lambda model: each_document_alone(model, (tokens,), STARTS)
    loss = lambda fn: nnx.jit(nnx.grad(lambda model: jnp.sum(fn(model) * cotangent)))

    logits = nnx.jit(packed)(model)
    assert rel_error(logits, nnx.jit(alone)(model)) < TOLERANCE
    unmasked = nnx.jit(lambda model: model(tokens))(model)
    assert rel_error(logits, unmasked) > 1e-3  # the mask changes what later documents see
    got, expected = loss(packed)(model), loss(alone)(model)
    for (path, g), (_, e) in zip(nnx.to_flat_state(got), nnx.to_flat_state(expected), strict=True):
        assert bool(jnp.all(jnp.isfinite(g[...]))), path
        assert rel_error(g[...], e[...]) < TOLERANCE, path


def test_bad_segment_ids_are_refused(rng):
    model = nn.LanguageModel(presets.model_config("tiny", vocab_size=VOCAB), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"segment_ids: expected a \(B, N\) = \(2, 8\) integer array"):
        model(tokens, segment_ids=jnp.zeros((2, 7), jnp.int32))
