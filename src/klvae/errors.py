"""Typed errors. Each names what was wrong (file, key, shape, dtype, size) so the caller can act on it."""

from __future__ import annotations


class KLVAEError(Exception):
    """Base class of every error klvae raises on purpose."""


class ConfigError(KLVAEError, ValueError):
    """A configuration is invalid: a field has a wrong type or value, or fields disagree."""


class WeightsError(KLVAEError, ValueError):
    """Weights could not be read or do not fit the model."""


class StateDictMismatchError(WeightsError):
    """A state dict's keys or shapes differ from what the model expects.

    ``missing``, ``unexpected`` and ``mismatched`` (``key -> (expected_shape, found_shape)``) hold the details.
    """

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]):
        self.source = source
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = dict(mismatched)
        lines = [f"{source}: the weights do not fit the model"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): " + ", ".join(_head(self.missing)))
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): " + ", ".join(_head(self.unexpected)))
        if self.mismatched:
            items = [f"{k} expected {tuple(e)} found {tuple(f)}" for k, (e, f) in self.mismatched.items()]
            lines.append(f"  mis-shaped keys ({len(items)}): " + "; ".join(_head(items)))
        super().__init__("\n".join(lines))


class InputShapeError(KLVAEError, ValueError):
    """An input tensor has a shape the model cannot process (wrong rank, channels, or spatial size)."""


def _head(items: list[str], limit: int = 20) -> list[str]:
    """The first ``limit`` items, plus a count of the rest, so huge key lists stay readable."""
    if len(items) <= limit:
        return list(items)
    return list(items[:limit]) + [f"... and {len(items) - limit} more"]


class DistributedError(KLVAEError, RuntimeError):
    """A distributed run cannot go ahead: no process group, or the ranks were given different inputs."""
