"""Datasets as lists of samples: a folder of images, or tar shards in the webdataset layout.

A sample's ``id`` is stable across runs and unique in the dataset: for a folder, the image's path relative to
the folder without its extension (``cats/001``); for tar shards, the webdataset key (the member path up to the
first dot of its file name: ``000123`` for ``000123.jpg`` + ``000123.json``). Uncompressed tars are indexed
once (header walk) and members are read by offset, so loader threads read them in parallel.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import tarfile

from klvae.errors import KLVAEError
from klvae.images import IMAGE_EXTENSIONS


class DatasetError(KLVAEError):
    """The dataset is missing, empty, or not in a layout the cache reads."""


@dataclasses.dataclass(frozen=True)
class Sample:
    id: str
    path: str                 # the image file, or the tar shard holding it
    offset: int = -1          # byte offset of the member's data in the tar (-1: a plain file)
    size: int = -1            # member size in bytes
    member: str = ""          # member name in the tar

    @property
    def source(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.source}: truncated tar member ({len(data)} of {self.size} bytes)")
        return data


def expand_braces(pattern: str) -> list[str]:
    """webdataset's shard notation: ``shard-{000..009}.tar`` -> ten names (zero padding kept)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    names = []
    for i in range(int(lo), int(hi) + 1):
        names += expand_braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])
    return names


def list_samples(dataset: list[str]) -> list[Sample]:
    """Every sample of the dataset, sorted by id; duplicate ids are an error."""
    samples: list[Sample] = []
    for item in dataset:
        if os.path.isdir(item):
            samples += _folder(item)
            continue
        paths = [p for name in expand_braces(item) for p in (sorted(glob.glob(name)) if glob.has_magic(name)
                                                              else [name])]
        if not paths:
            raise DatasetError(f"{item}: matches no file")
        for path in paths:
            if not os.path.isfile(path):
                raise DatasetError(f"{path}: no such file or folder")
            samples += _tar(path)
    if not samples:
        raise DatasetError(f"{' '.join(dataset)}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files, "
                           "or .tar shards)")
    samples.sort(key=lambda s: s.id)
    for a, b in zip(samples, samples[1:]):
        if a.id == b.id:
            raise DatasetError(f"two images have the id {a.id!r}: {a.source} and {b.source}; ids must be unique")
    return samples


def _folder(root: str) -> list[Sample]:
    """Images under ``root`` (nested folders, hidden entries skipped); a folder of tars reads the tars."""
    images, tars = [], []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            if name.lower().endswith(IMAGE_EXTENSIONS):
                rel = os.path.relpath(path, root)
                images.append(Sample(id=os.path.splitext(rel)[0].replace(os.sep, "/"), path=path))
            elif name.endswith(".tar"):
                tars.append(path)
    if images and tars:
        raise DatasetError(f"{root}: holds both images and .tar shards; point the cache at one kind")
    return images or [s for t in tars for s in _tar(t)]


def _tar(path: str) -> list[Sample]:
    if not path.endswith(".tar"):
        raise DatasetError(f"{path}: not a .tar shard or image folder (compressed shards such as .tar.gz cannot "
                           "be read by offset; decompress them)")
    try:
        with tarfile.open(path, mode="r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError) as e:
        raise DatasetError(f"{path}: cannot read as an uncompressed tar ({e})") from None
    samples, seen = [], set()
    for m in members:
        base = os.path.basename(m.name)
        if base.startswith(".") or "." not in base:
            continue
        key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
        ext = base.split(".", 1)[1].lower()
        if "." + ext.rsplit(".", 1)[-1] not in IMAGE_EXTENSIONS or key in seen:
            continue  # not an image, or the sample's second image (the first is encoded)
        seen.add(key)
        samples.append(Sample(id=key, path=path, offset=m.offset_data, size=m.size, member=m.name))
    return samples
