"""Shared test utilities: random inputs, relative errors and the size of a jaxpr's intermediates."""

import jax
import jax.numpy as jnp
import numpy as np


def random_qkv(rng, batch=2, length=37, heads=3, key_dim=8, value_dim=5, dtype=jnp.float64,
               decay=True, non_negative=False):
    """Random (q, k, v, log_decay) with log-decays in [-0.5, 0]; q, k >= 0 when ``non_negative``."""
    q = rng.standard_normal((batch, length, heads, key_dim))
    k = rng.standard_normal((batch, length, heads, key_dim))
    if non_negative:
        q, k = np.abs(q), np.abs(k)
    v = rng.standard_normal((batch, length, heads, value_dim))
    log_decay = -rng.uniform(0.0, 0.5, (batch, length, heads)) if decay else None
    cast = lambda x: None if x is None else jnp.asarray(x, dtype)
    return cast(q), cast(k), cast(v), (None if log_decay is None else jnp.asarray(log_decay, jnp.float64))


def segment_ids(starts, length):
    """(rows, length) int32 document ids from each row's document starts (``starts[row]``, the first 0): 1 for
    the first document of a row, 2 for the next, ..."""
    ids = np.zeros((len(starts), length), np.int32)
    for row, row_starts in enumerate(starts):
        for start in row_starts:
            ids[row, start:] += 1
    return jnp.asarray(ids)


def each_document_alone(fn, arrays, starts):
    """``fn(*pieces)`` on each document of each row alone, the pieces being the document's (1, tokens, ...)
    slices of ``arrays`` (None passed as it is), put back in place along the tokens' axis."""
    length = next(x for x in arrays if x is not None).shape[1]
    rows = []
    for row, row_starts in enumerate(starts):
        ends = (*row_starts[1:], length)
        rows.append(jnp.concatenate([fn(*(None if x is None else x[row:row + 1, s:e] for x in arrays))
                                     for s, e in zip(row_starts, ends)], axis=1))
    return jnp.concatenate(rows, axis=0)


def rel_error(x, y) -> float:
    """Frobenius-norm relative error ||x - y|| / ||y||, in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-300))


def tree_rel_error(xs, ys) -> float:
    return max(rel_error(x, y) for x, y in zip(jax.tree.leaves(xs), jax.tree.leaves(ys), strict=True))


def prefill_then_step(module, inputs, prefill: int, max_len: int):
    """Decode ``inputs`` (B, N, ...) through ``module.step``: the first ``prefill`` at once, then one at a time.

    Returns the outputs concatenated along N, to compare with one forward pass.
    """
    cache = module.init_cache(inputs.shape[0], max_len=max_len)
    out, cache = module.step(inputs[:, :prefill], cache)
    outs = [out]
    for t in range(prefill, inputs.shape[1]):
        out, cache = module.step(inputs[:, t:t + 1], cache)
        outs.append(out)
    return jnp.concatenate(outs, axis=1)


def all_equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (scans, loops, VJPs, jit and kernel calls)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from all_equations(inner)


def largest_intermediate(jaxpr) -> int:
    """Elements of the largest array a jaxpr makes, inside scans, loops and VJPs too."""
    shapes = (getattr(var.aval, "shape", ()) for eqn in all_equations(jaxpr) for var in eqn.outvars)
    return max((int(np.prod(shape)) if shape else 1 for shape in shapes), default=0)
