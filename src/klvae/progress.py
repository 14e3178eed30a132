"""Progress reporting shared by the command line and the latent cache (tqdm on an interactive stderr)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None, desc: str, quiet: bool, unit: str = "img") -> Iterator[T]:
    """``items`` with a progress bar on an interactive stderr (tqdm, when installed)."""
    if quiet or not sys.stderr.isatty():
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield from items
        return
    yield from tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
