"""Mesh axis names the modules know, and ``per_head``: the mixer cores run per head under ``jax.shard_map``.

Inside ``jax.set_mesh(mesh)`` (the trainer's), the attention cores (decayed attention, SSD, softmax) see only
their shard: batch rows over the data axes, whole heads over the tensor axis. So a Pallas kernel, which XLA
cannot partition, never sees a sharded head or a global batch. Outside a mesh the core is simply called.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # mesh axes the batch is split over
TENSOR_AXIS = "tensor"  # mesh axis heads (and the MLP) are split over


def _current_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not {*BATCH_AXES, TENSOR_AXIS} & set(mesh.axis_names):
        return None
    return mesh


def batch_sharded(x):
    """``x`` (B, ...) laid out with its rows over the data axes and the rest whole on every device, under a mesh
    (else unchanged): the residual stream's layout. Without it, the sharding of a tensor-parallel projection's
    summed output leaked into the stream and XLA replicated whole activations to change it."""
    mesh = _current_mesh()
    if mesh is None:
        return x
    batch = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names) or None
    return jax.lax.with_sharding_constraint(x, P(batch, *([None] * (x.ndim - 1))))


def per_head(core, *arrays, segment_ids=None):
    """``core(*arrays)`` with every array laid out (B, N, H, ...) (per-head scalars (B, N, H)); the result is
    (B, N, H, d). Under a mesh each device runs ``core`` on its batch rows and heads. ``segment_ids`` (B, N),
    when given, goes to ``core`` as that keyword, split by rows only."""
    mesh = _current_mesh()
    extra = () if segment_ids is None else (segment_ids,)
    run = core if segment_ids is None else (lambda *xs: core(*xs[:-1], segment_ids=xs[-1]))
    if mesh is None:
        return run(*arrays, *extra)
    batch = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names) or None
    heads = TENSOR_AXIS if TENSOR_AXIS in mesh.axis_names else None
    specs = tuple(P(batch, None, heads, *([None] * (x.ndim - 3))) for x in arrays) + tuple(P(batch, None)
                                                                                          for _ in extra)
    return jax.shard_map(run, in_specs=specs, out_specs=P(batch, None, heads, None), check_vma=False)(*arrays,
                                                                                                     *extra)
