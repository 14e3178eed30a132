"""Spill files for exact tiling: stored activations kept on disk instead of in memory (no torch, no jax).

A plan made with ``spill`` (:func:`klvae.tiling_plan.plan_exact`) marks some stored nodes *spilled*. The executor
keeps them in a :class:`SpillStore`: each tile's chunk is written to its own file as it is made, and a later tile
reads back only the rectangle it needs (through a read-only memory map, copied out, so no file page stays mapped).
Written files sit in the operating system's page cache, which the kernel writes out and reclaims under pressure:
they do not count against the process's resident memory. The files live in a fresh temporary folder that
:func:`spill_folder` deletes when the run ends, on an error too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from klvae.errors import KLVAEError
from klvae.tiling_executor import ChunkStore, ExactExecutor, TileOps, crop
from klvae.tiling_plan import ExactPlan

# Free space to leave on the spill folder's file system beyond what the plan writes.
_DISK_MARGIN = 1 << 30


class SpillSpaceError(KLVAEError, OSError):
    """The spill folder's file system has less free space than the plan's spill files need."""


@contextlib.contextmanager
def spill_folder(parent: str | None, needed: int) -> Iterator[str]:
    """A new temporary folder under ``parent`` (default: the system's temporary folder) with room for ``needed``
    bytes of spill files, deleted with everything in it when the block ends."""
    parent = parent or tempfile.gettempdir()
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"spill folder {parent!r} does not exist")
    free = shutil.disk_usage(parent).free
    if free < needed + _DISK_MARGIN:
        raise SpillSpaceError(f"exact tiling would spill up to {needed / 2**30:.1f} GiB to {parent!r}, which has "
                              f"{free / 2**30:.1f} GiB free; pass spill=<a folder with room>, or a larger "
                              f"memory_limit")
    folder = tempfile.mkdtemp(prefix="klvae-spill-", dir=parent)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class SpillStore(ChunkStore):
    """A node held as one file per tile chunk in ``folder``; reads return copies of the rectangles asked for.

    The backend's ``ops.to_host(array)`` gives a numpy array of the chunk's bytes (with a token that
    ``ops.from_host(array, token)`` turns back into the backend's array of the right dtype and device).
    """

    def __init__(self, name: str, rows: tuple[int, ...], cols: tuple[int, ...], ops: TileOps, folder: str):
        super().__init__(rows, cols, ops)
        self.prefix = os.path.join(folder, name.replace("/", "_").replace(".", "_"))
        self.files: dict[tuple[int, int], tuple[str, tuple[int, ...], np.dtype, Any]] = {}

    def write(self, key: tuple[int, int], region, value) -> None:
        array, token = self.ops.to_host(value)
        path = f"{self.prefix}-{key[0]}-{key[1]}.bin"
        np.ascontiguousarray(array).tofile(path)
        self.files[key] = (path, array.shape, array.dtype, token)
        self.chunks[key] = (None, self.rows[key[0]], self.rows[key[0] + 1])  # which chunks exist, for releases()

    def piece(self, key: tuple[int, int], want) -> Any:
        """The rectangle ``want`` of chunk ``key``, read back from its file (``read`` is ChunkStore's)."""
        path, shape, dtype, token = self.files[key]
        mapped = np.memmap(path, dtype=dtype, mode="r", shape=shape)
        piece = np.array(crop(mapped, self.held(key), want, self.ops.row_axis))  # a copy: the mapping goes now
        del mapped
        return self.ops.from_host(piece, token)

    def release(self, key: tuple[int, int], keep_from: int | None) -> None:
        """Delete chunk ``key``'s file once no later tile reads it (a partly read chunk stays whole)."""
        if keep_from is None and key in self.files:
            os.remove(self.files.pop(key)[0])
            del self.chunks[key]

    def whole(self):
        raise AssertionError("a spilled node is never read whole")


class SpillingExecutor(ExactExecutor):
    """:class:`~klvae.tiling_executor.ExactExecutor` for plans with spilled nodes: their files go in a temporary
    folder inside ``spill_dir`` (default: the system's temporary folder), deleted when :meth:`run` returns or
    raises."""

    def __init__(self, plan: ExactPlan, ops: TileOps, spill_dir: str | None = None):
        super().__init__(plan, ops)
        self.spill_dir = spill_dir
        self.folder: str | None = None

    def run(self, x: Any) -> Any:
        with spill_folder(self.spill_dir, self.plan.spill_bytes()) as self.folder:
            try:
                return super().run(x)
            finally:
                self.stores.clear()
                self.folder = None

    def spilled_store(self, name: str, rows: tuple[int, ...], cols: tuple[int, ...]) -> SpillStore:
        return SpillStore(name, rows, cols, self.ops, self.folder)


__all__ = ["SpillSpaceError", "SpillStore", "SpillingExecutor", "spill_folder"]
