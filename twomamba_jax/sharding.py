"""Meshes and parameter shardings: a ``(data, fsdp, tensor)`` mesh from a config, and logical-axis rules.

Parameters carry logical axis names (``twomamba_jax.nn.initializers.make_param``); ``LOGICAL_RULES`` maps them onto
the mesh: FSDP shards the model width, tensor parallelism splits heads, the MLP and the vocabulary, and the batch
is split over ``data`` and ``fsdp``. The mixer cores run per head under ``jax.shard_map``
(``twomamba_jax.nn.partitioning``).
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from twomamba_jax.nn.partitioning import BATCH_AXES, TENSOR_AXIS

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "heads": TENSOR_AXIS,
    "kv_heads": TENSOR_AXIS,
    "mlp": TENSOR_AXIS,
    "vocab": TENSOR_AXIS,
    "head_dim": None,
    "conv": None,
}
_logger = logging.getLogger(__name__)


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1, num_devices: int | None = None) -> tuple[int, ...]:
    """Axis sizes with at most one -1 ("the rest") resolved; their product must equal the device count."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{name}: expected a positive int or -1 (the rest of the devices); got {size!r}")
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh: at most one axis may be -1; got {rest}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if num_devices % known:
            raise ValueError(f"mesh: the fixed axes {sizes} (product {known}) do not divide the {num_devices} devices")
        sizes[rest[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh: data x fsdp x tensor = {sizes} uses {math.prod(sizes.values())} devices; "
                         f"expected all {num_devices} (use -1 for one axis to take the rest)")
    return tuple(sizes[name] for name in MESH_AXES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all), auto-sharded axes (GSPMD)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_mesh(spec: P, shape: tuple[int, ...], mesh: Mesh, name: str = "") -> P:
    """Logical names -> mesh axes. A dim the mesh axis does not divide stays whole (said once per parameter)."""
    axes = []
    for logical, dim in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape, strict=True):
        if logical is not None and logical not in LOGICAL_RULES:
            raise ValueError(f"{name}: unknown logical axis {logical!r}; expected one of {sorted(LOGICAL_RULES)}")
        mesh_axes = LOGICAL_RULES.get(logical) if logical else None
        size = math.prod(mesh.shape[a] for a in np.atleast_1d(mesh_axes)) if mesh_axes else 1
        if size > 1 and dim % size:
            _logger.warning("sharding: %s dim %r (%d) is not divisible by mesh axes %s (%d); kept whole", name,
                            logical, dim, mesh_axes, size)
            mesh_axes = None
        axes.append(mesh_axes if size > 1 else None)
    return P(*axes)


def param_shardings(abstract_params: nnx.State, mesh: Mesh):
    """NamedShardings for a state of parameters (as ``nnx.split`` gives), from their logical axis names."""
    specs = nnx.get_partition_spec(abstract_params)

    def sharding(path, spec, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        return NamedSharding(mesh, logical_to_mesh(spec, leaf.shape, mesh, name))

    return jax.tree_util.tree_map_with_path(sharding, specs, abstract_params,
                                            is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(B, N) token batches: rows over the data axes."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def process_batch_share(mesh: Mesh) -> tuple[int, int]:
    """(index, count): this process feeds rows [index * B / count, (index + 1) * B / count) of every global batch
    of B rows. The rows are split over the batch axes (``data`` major, then ``fsdp``); processes whose devices
    differ only along ``tensor`` (a tensor group spanning hosts) feed the same rows."""
    blocks = [mesh.shape[axis] for axis in BATCH_AXES]
    position = {name: i for i, name in enumerate(mesh.axis_names)}
    mine = sorted({int(np.ravel_multi_index([index[position[axis]] for axis in BATCH_AXES], blocks))
                   for index, device in np.ndenumerate(mesh.devices) if device.process_index == jax.process_index()})
    size = len(mine)
    if mine != list(range(mine[0], mine[0] + size)) or mine[0] % size:
        raise ValueError(f"mesh: the devices of process {jax.process_index()} hold row blocks {mine} of "
                         f"{math.prod(blocks)}, not one contiguous share of the batch")
    return mine[0] // size, math.prod(blocks) // size


def check_mesh_fits(mesh: Mesh, *, num_heads: int, num_kv_heads: int | None, batch_size: int) -> None:
    """Errors, before anything compiles, for heads the tensor axis does not divide or a batch the data axes do not."""
    tensor = mesh.shape[TENSOR_AXIS]
    for name, heads in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if heads is not None and heads % tensor:
            raise ValueError(f"mesh.tensor: {tensor} does not divide the model's {name}={heads}; tensor parallelism "
                             "splits whole heads")
    rows = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if batch_size % rows:
        raise ValueError(f"data.batch_size: {batch_size} is not divisible by mesh.data x mesh.fsdp = {rows}")
