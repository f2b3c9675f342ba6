"""Document masking at the model level: ``LanguageModel(tokens, segment_ids)`` on packed rows gives, document by
document, the logits and parameter gradients of each document run alone, for the decayed mixers, softmax
attention (a segment mask) and Mamba-2 (its conv and SSD stopped at document starts); float64 parameters, 1e-6
(the RMSNorms compute in float32). The trainer masks packed text by default (``data.cross_document=false``).
Decoding from packed prompts (``LanguageModel.step``, ``generate`` with segment ids) continues each row's last
document alone."""

import jax.numpy as jnp
import pytest
from flax import nnx
from helpers import each_document_alone, rel_error, segment_ids

from twomamba_jax import nn, presets
from twomamba_jax.generate import generate

# Row 0: documents of 3, 1, 8 and 12 tokens; row 1: one document.
STARTS = [(0, 3, 4, 12), (0,)]
DECODE_STARTS = [(0, 3, 4, 12, 22), (0,)]
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


@pytest.mark.parametrize("mixer", ["2mamba", "2mamba-e", "softmax", "mamba2"])
def test_decoding_from_packed_prompts_continues_each_rows_last_document(rng, mixer):
    """``LanguageModel.step`` with segment ids: a packed prompt prefilled in two calls (the second continuing the
    cache's document, then starting a new one) gives the masked model's logits, and the tokens decoded after it
    see each row's last document alone: the recurrent states and the conv histories forget the earlier documents,
    the KV caches mask them (2Mamba-E through its stored log-decays, softmax from the document's first slot).
    Row 0's last document is 2 tokens, shorter than the conv's history."""
    config = presets.model_config("tiny", mixer=mixer, vocab_size=VOCAB, num_layers=1, dtype=jnp.float64,
                                  param_dtype=jnp.float64)
    model = nn.LanguageModel(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(rng.integers(0, VOCAB, (len(DECODE_STARTS), LENGTH)))
    new_tokens = jnp.asarray(rng.integers(0, VOCAB, (len(DECODE_STARTS), 3)))
    ids = segment_ids(DECODE_STARTS, LENGTH)
    step = nnx.jit(lambda model, tokens, cache, ids: model.step(tokens, cache, ids))

    def decode(cache, rows):
        logits = []
        for t in range(new_tokens.shape[1]):
            out, cache = step(model, new_tokens[rows, t:t + 1], cache, None)
            logits.append(out)
        return jnp.concatenate(logits, axis=1)

    cache = model.init_cache(len(DECODE_STARTS), LENGTH + new_tokens.shape[1])
    first, cache = step(model, tokens[:, :10], cache, ids[:, :10])  # row 0's third document runs on past 10
    second, cache = step(model, tokens[:, 10:], cache, ids[:, 10:])
    packed = nnx.jit(lambda model: model(tokens, segment_ids=ids))(model)
    assert rel_error(jnp.concatenate([first, second], axis=1), packed) < TOLERANCE
    decoded = decode(cache, slice(None))
    last = [row_starts[-1] for row_starts in DECODE_STARTS]
    alone = []
    for row, start in enumerate(last):
        row_cache = model.init_cache(1, LENGTH - start + new_tokens.shape[1])
        _, row_cache = step(model, tokens[row:row + 1, start:], row_cache, None)
        alone.append(decode(row_cache, slice(row, row + 1)))
    assert rel_error(decoded, jnp.concatenate(alone, axis=0)) < TOLERANCE
    unmasked_cache = model.init_cache(len(DECODE_STARTS), LENGTH + new_tokens.shape[1])
    _, unmasked_cache = step(model, tokens, unmasked_cache, None)
    assert rel_error(decode(unmasked_cache, slice(None))[0], decoded[0]) > 50 * TOLERANCE  # earlier documents count


def test_generation_continues_the_last_document_of_packed_prompts(rng):
    model = nn.LanguageModel(presets.model_config("tiny", mixer="2mamba", vocab_size=VOCAB, num_layers=1),
                             rngs=nnx.Rngs(0))
    tokens = jnp.asarray(rng.integers(0, VOCAB, (1, LENGTH)))
    ids = segment_ids(STARTS[:1], LENGTH)
    packed = generate(model, tokens, max_new_tokens=4, segment_ids=ids)
    alone = generate(model, tokens[:, STARTS[0][-1]:], max_new_tokens=4)
    assert (packed[:, LENGTH:] == alone[:, -4:]).all()
    with pytest.raises(ValueError, match=r"segment_ids: expected a \(B, N\) = \(1, 24\) integer array"):
        generate(model, tokens, max_new_tokens=4, segment_ids=ids[:, 1:])


def test_bad_segment_ids_are_refused(rng):
    model = nn.LanguageModel(presets.model_config("tiny", vocab_size=VOCAB), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"segment_ids: expected a \(B, N\) = \(2, 8\) integer array"):
        model(tokens, segment_ids=jnp.zeros((2, 7), jnp.int32))
