"""Data parallelism over a ``jax.sharding.Mesh``: parameters replicated, the batch split along one mesh axis.

``jax.jit`` then runs encode/decode as one SPMD program; no collective is needed (each device handles its own
images), so the result equals the single-device one::

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    params = replicate(params, mesh)
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode").sample)
    images = decode(params, shard_batch(latents, mesh))     # sharded along the batch like its input
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from klvae.errors import InputShapeError


def replicate(params: Any, mesh: Mesh) -> Any:
    """``params`` with a full copy on every device of ``mesh``."""
    return jax.device_put(params, NamedSharding(mesh, PartitionSpec()))


def batch_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
    """Split dimension 0 (the batch) over the mesh axis ``axis``; the other dimensions stay whole."""
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r} (axes: {', '.join(mesh.axis_names)})")
    return NamedSharding(mesh, PartitionSpec(axis))


def shard_batch(x: Any, mesh: Mesh, axis: str = "data") -> jax.Array:
    """Place a (B, ...) array with its batch split over ``axis``; B must divide evenly."""
    devices = mesh.shape[axis] if axis in mesh.shape else 0
    if devices and x.shape[0] % devices:
        raise InputShapeError(f"a batch of {x.shape[0]} does not split over {devices} devices on mesh axis "
                              f"{axis!r}; pad the batch to a multiple of {devices}")
    return jax.device_put(x, batch_sharding(mesh, axis))
