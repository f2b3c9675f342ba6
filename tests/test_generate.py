"""Generation: greedy decoding through the cache equals the argmax of one full forward at every position (every
mixer preset), sampling is reproducible by seed and its cuts act as stated, the decode step compiles once, and
``twomamba-generate`` continues a prompt from a training run's checkpoint (or says in one line why it cannot)."""

import numpy as np
import pytest
from flax import nnx

from twomamba_jax import generate as generation
from twomamba_jax import nn, presets
from twomamba_jax.train.cli import generate_main

VOCAB = 40
# Two logits closer than this in float32 may swap between the cached and the full forward: a tie, not an error.
TIE = 1e-4


def _model(mixer, seed=0):
    config = presets.model_config("tiny", mixer=mixer, vocab_size=VOCAB, model_dim=64, num_layers=2, num_heads=2,
                                  head_dim=32, mlp_dim=64)
    return nn.LanguageModel(config, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("mixer", sorted(presets.MIXER_PRESETS))
def test_greedy_generation_is_the_argmax_of_the_full_forward(rng, mixer):
    model = _model(mixer)
    prompt = rng.integers(0, VOCAB, (2, 5), dtype=np.int32)
    tokens = np.asarray(generation.generate(model, prompt, max_new_tokens=6))
    assert tokens.shape == (2, 11) and (tokens[:, :5] == prompt).all()
    logits = np.asarray(model(tokens[:, :-1]))[:, 4:]  # the logits that chose tokens 5, 6, ..., 10
    chosen = np.take_along_axis(logits, tokens[:, 5:, None], axis=-1)[..., 0]
    assert (chosen >= logits.max(-1) - TIE).all(), (tokens[:, 5:], logits.argmax(-1))


def test_sampling_is_reproducible_and_its_cuts_hold(rng):
    model = _model("2mamba")
    prompt = rng.integers(0, VOCAB, (3, 4), dtype=np.int32)
    sample = lambda **options: np.asarray(generation.generate(model, prompt, max_new_tokens=8, **options))
    first = sample(temperature=1.0, seed=7)
    assert (first == sample(temperature=1.0, seed=7)).all()
    assert (first != sample(temperature=1.0, seed=8)).any()
    greedy = sample()
    assert (sample(temperature=1.0, top_k=1, seed=3) == greedy).all()  # one token left: the argmax
    assert (sample(temperature=1.0, top_p=1e-6, seed=3) == greedy).all()  # the most likely token always stays
    assert ((first >= 0) & (first < VOCAB)).all()


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = np.log(np.array([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]], np.float32))
    kept = np.isfinite(np.asarray(generation._nucleus(logits, 0.7)))
    assert kept.tolist() == [[True, False, True, False], [True, True, True, False]]


def test_the_decode_step_compiles_once():
    model = _model("softmax")  # a KV cache: fixed-size slots, so one compiled step serves every position
    generation.compiled_steps.cache_clear()
    generation.generate(model, np.zeros((1, 3), np.int32), max_new_tokens=7)
    prefill, step = generation.compiled_steps(nnx.split(model)[0], 0.0, None, None)
    info = generation.compiled_steps.cache_info()
    assert info.hits == 1 and info.currsize == 1
    assert prefill._cache_size() == 1 and step._cache_size() == 1


@pytest.mark.parametrize("options,message", [
    (dict(max_new_tokens=0), "max_new_tokens: expected an int >= 1"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature: expected a finite number >= 0"),
    (dict(max_new_tokens=2, top_k=0), "top_k: expected an int >= 1"),
    (dict(max_new_tokens=2, top_p=1.5), r"top_p: expected a number in \(0, 1\]"),
])
def test_bad_arguments_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        generation.generate(_model("2mamba"), np.zeros((1, 3), np.int32), **options)
    with pytest.raises(ValueError, match="prompt: expected integer token ids of shape"):
        generation.generate(_model("2mamba"), np.zeros((1, 0), np.int32), max_new_tokens=1)


def test_command_line_continues_a_prompt_from_a_trained_run(text_run, tmp_path, capsys):
    workdir = str(text_run[0])
    assert generate_main([str(tmp_path), "--prompt", "the"]) == 2
    assert capsys.readouterr().err.strip() == (f"twomamba-generate: error: workdir: {str(tmp_path)!r} has no "
                                               "config.json (expected a twomamba-train work directory)")
    assert generate_main([workdir, "--prompt", "the quick", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the quick") and out.endswith("\n")

    # The same continuation as the API gives on the restored parameters: the checkpoint is what generates.
    from twomamba_jax.train.workdir import load

    trained = load(workdir)
    assert trained.step == 2
    ids = generation.generate(trained.model, trained.tokenizer.encode("the quick")[None], max_new_tokens=5)
    assert out[:-1] == trained.tokenizer.decode(np.asarray(ids)[0])
    assert generate_main([workdir, "--prompt", ""]) == 2
    assert "--prompt: expected at least one token" in capsys.readouterr().err
    assert generate_main([workdir, "--prompt", "the", "--temperature", "-1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == (
        "twomamba-generate: error: temperature: expected a finite number >= 0 (0: greedy); got -1.0")
