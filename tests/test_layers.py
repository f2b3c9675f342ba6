"""``nn.CausalConv`` against a loop over taps (float64): the whole channel block and one part of it at a time
(``part=``, as the mixer convolves q, k and v), with a decoding history and with document starts."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import rel_error, segment_ids

from twomamba_jax import nn

WINDOW, LENGTH, CHANNELS = 3, 11, (3, 2, 4)
STARTS = [(0, 4, 5), (0,)]


def _loop_oracle(x, history, kernel, bias, ids):
    """u_t = b + sum_s K[s] x_{t-s}, x before the row being the history, taps across a document start zeroed."""
    padded = np.concatenate([history, x], axis=1)
    document = np.cumsum(np.concatenate([np.zeros((x.shape[0], 1), int), np.diff(ids, axis=1) != 0], axis=1), 1)
    u = np.broadcast_to(bias, x.shape).copy()
    for row in range(x.shape[0]):
        for t in range(x.shape[1]):
            for s in range(WINDOW):
                if t - s >= 0 and document[row, t - s] != document[row, t]:
                    continue  # an earlier document (the history counts as the first one)
                u[row, t] += kernel[s] * padded[row, WINDOW - 1 + t - s]
    return u


@pytest.mark.parametrize("masked", [False, True])
def test_conv_and_its_parts_equal_a_loop_over_taps(rng, masked):
    conv = nn.CausalConv(WINDOW, CHANNELS, (None, None, None), param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    x = rng.standard_normal((len(STARTS), LENGTH, *CHANNELS))
    history = rng.standard_normal((len(STARTS), WINDOW - 1, *CHANNELS))
    ids = segment_ids(STARTS, LENGTH) if masked else None
    expected = _loop_oracle(x, history, np.asarray(conv.kernel[...]), np.asarray(conv.bias[...]),
                            np.asarray(ids) if masked else np.ones((len(STARTS), LENGTH), int))

    u, new_history = conv(jnp.asarray(x), jnp.asarray(history), ids)
    assert rel_error(u, expected) < 1e-12
    np.testing.assert_array_equal(new_history, x[:, -(WINDOW - 1):])
    for part in range(CHANNELS[0]):
        u_part, history_part = conv(jnp.asarray(x[:, :, part]), jnp.asarray(history[:, :, part]), ids, part=part)
        assert rel_error(u_part, expected[:, :, part]) < 1e-12, part
        np.testing.assert_array_equal(history_part, x[:, -(WINDOW - 1):, part])
