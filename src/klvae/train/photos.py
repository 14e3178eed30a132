"""The default model's photographs: a committed manifest of files inside Debian wallpaper packages and scikit-image.

``photos.json`` (beside this module) lists every candidate image with its package, path inside the package, use
(``train``, ``heldout`` or ``excluded``, with the reason), licence, credit and sha256. :func:`fetch_packages`
downloads the pinned Debian packages (``apt-get download PKG=VERSION`` + ``dpkg -x``) into a cache;
:func:`prepare_folder` then writes exactly the manifest's images of one use, sha256-verified and downscaled, into a
folder, each file atomically. Nothing outside the manifest is ever written there, and a folder holding images the
manifest does not name is refused.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from klvae.errors import KLVAEError

MANIFEST_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "photos.json")
USES = ("train", "heldout", "excluded")
SOURCES = ("debian", "python")
STAMP = ".photos-manifest.json"           # hidden: list_images skips it


class PhotoDataError(KLVAEError):
    """The photo manifest is malformed, a package or file does not match it, or a data folder is inconsistent."""


@dataclasses.dataclass(frozen=True)
class Package:
    name: str
    source: str                     # "debian": a .deb from apt; "python": an installed Python distribution
    version: str
    copyright: str | None = None    # path of the DEP-5 copyright file inside the package (debian)
    deb_sha256: str | None = None   # sha256 of the .deb (debian)
    module: str | None = None       # importable module whose parent folder is the package root (python)


@dataclasses.dataclass(frozen=True)
class Photo:
    name: str                       # output file stem, unique
    package: str
    path: str                       # inside the package (debian: as installed; python: from site-packages)
    use: str
    sha256: str
    licence: str
    credit: str = ""
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Manifest:
    packages: dict[str, Package]
    photos: tuple[Photo, ...]
    short_side: int                 # images whose shorter side is longer are downscaled to it (Lanczos)
    digest: str                     # sha256 of the manifest's canonical JSON

    def select(self, use: str) -> list[Photo]:
        return [p for p in self.photos if p.use == use]


def _fields(cls: type, data: Any, where: str) -> dict[str, Any]:
    """``data`` checked against the dataclass's fields: a mapping, every required key present, no unknown key,
    every value a string (or an int where the field says so)."""
    if not isinstance(data, Mapping):
        raise PhotoDataError(f"{where}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PhotoDataError(f"{where}: unknown key(s) {', '.join(unknown)}")
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING:
                raise PhotoDataError(f"{where}: missing key '{name}'")
            continue
        if not isinstance(data[name], str):
            raise PhotoDataError(f"{where}.{name}: expected a string, got {data[name]!r}")
    return dict(data)


def parse_manifest(data: Any, source: str = "manifest") -> Manifest:
    """Validate a decoded manifest (``{"short_side": int, "packages": {...}, "photos": [...]}``)."""
    if not isinstance(data, Mapping):
        raise PhotoDataError(f"{source}: expected a JSON object at the top")
    unknown = sorted(set(data) - {"short_side", "packages", "photos", "comment"})
    if unknown:
        raise PhotoDataError(f"{source}: unknown key(s) {', '.join(unknown)}")
    short_side = data.get("short_side")
    if not isinstance(short_side, int) or isinstance(short_side, bool) or short_side < 8:
        raise PhotoDataError(f"{source}: 'short_side' must be an integer >= 8, got {short_side!r}")
    raw_packages = data.get("packages")
    if not isinstance(raw_packages, Mapping) or not raw_packages:
        raise PhotoDataError(f"{source}: 'packages' must be a non-empty object")
    packages = {}
    for name, entry in raw_packages.items():
        where = f"{source}: packages.{name}"
        package = Package(name=name, **_fields(_PackageEntry, entry, where))
        if package.source not in SOURCES:
            raise PhotoDataError(f"{where}.source: must be one of {', '.join(SOURCES)}, got {package.source!r}")
        needed = ("copyright", "deb_sha256") if package.source == "debian" else ("module",)
        for key in needed:
            if not getattr(package, key):
                raise PhotoDataError(f"{where}: a {package.source} package needs '{key}'")
        packages[name] = package
    raw_photos = data.get("photos")
    if not isinstance(raw_photos, list) or not raw_photos:
        raise PhotoDataError(f"{source}: 'photos' must be a non-empty list")
    photos, names, paths = [], set(), set()
    for i, entry in enumerate(raw_photos):
        where = f"{source}: photos[{i}]"
        photo = Photo(**_fields(Photo, entry, where))
        where = f"{source}: photos[{i}] ({photo.name})"
        if photo.package not in packages:
            raise PhotoDataError(f"{where}.package: {photo.package!r} is not listed under 'packages'")
        if photo.use not in USES:
            raise PhotoDataError(f"{where}.use: must be one of {', '.join(USES)}, got {photo.use!r}")
        if len(photo.sha256) != 64 or any(c not in "0123456789abcdef" for c in photo.sha256):
            raise PhotoDataError(f"{where}.sha256: not a lowercase hex sha256: {photo.sha256!r}")
        if photo.use == "excluded" and not photo.note:
            raise PhotoDataError(f"{where}: an excluded image needs a 'note' saying why")
        if os.path.isabs(photo.path) or ".." in photo.path.split("/"):
            raise PhotoDataError(f"{where}.path: must be relative inside the package: {photo.path!r}")
        if photo.name in names or not photo.name or "/" in photo.name or photo.name.startswith("."):
            raise PhotoDataError(f"{where}.name: empty, hidden, with '/' or not unique: {photo.name!r}")
        if (photo.package, photo.path) in paths:
            raise PhotoDataError(f"{where}: {photo.package}:{photo.path} is listed twice")
        names.add(photo.name)
        paths.add((photo.package, photo.path))
        photos.append(photo)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return Manifest(packages, tuple(photos), short_side, hashlib.sha256(canonical).hexdigest())


@dataclasses.dataclass(frozen=True)
class _PackageEntry:                # Package without its name (the key of the 'packages' object)
    source: str
    version: str
    copyright: str | None = None
    deb_sha256: str | None = None
    module: str | None = None


def load_manifest(path: str = MANIFEST_PATH) -> Manifest:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PhotoDataError(f"{path}: photo manifest not found") from None
    except json.JSONDecodeError as e:
        raise PhotoDataError(f"{path}: not valid JSON: {e}") from None
    return parse_manifest(data, path)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- Debian copyright files (DEP-5) ---------------------------------------------------------------------------

def parse_dep5(text: str) -> list[dict[str, str]]:
    """The ``Files`` stanzas of a machine-readable debian/copyright file: ``[{"files", "copyright", "license"}]``
    (continuation lines joined with newlines; ``license`` is the first line of the License field)."""
    stanzas, current, key = [], {}, None
    for line in text.splitlines() + [""]:
        if not line.strip():
            if "files" in current:
                stanzas.append(current)
            current, key = {}, None
        elif line[0] in " \t":
            if key is not None and line.strip() != ".":
                current[key] += "\n" + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            current[key] = value.strip()
        else:
            key = None
    for s in stanzas:
        s["license"] = s.get("license", "").split("\n")[0].strip()
        s.setdefault("copyright", "")
    return stanzas


def _pattern_matches(pattern: str, path: str) -> bool:
    """A DEP-5 Files pattern (relative to the source tree) against a path as installed: the pattern matches a
    trailing part of the path, or, when its last component has no wildcard, the file name alone (installs often
    flatten the source folders, e.g. ``16.04/x.jpg`` -> ``usr/share/backgrounds/x.jpg``)."""
    if fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*/" + pattern):
        return True
    base = pattern.rsplit("/", 1)[-1]
    return not any(c in base for c in "*?[") and base == path.rsplit("/", 1)[-1]


def dep5_entry(text: str, path: str) -> dict[str, str] | None:
    """The stanza that governs ``path`` (the last matching one, as DEP-5 says), or None."""
    found = None
    for stanza in parse_dep5(text):
        if any(_pattern_matches(p, path) for p in stanza["files"].split()):
            found = stanza
    return found


# --- fetching the Debian packages -----------------------------------------------------------------------------

def _run(cmd: list[str], cwd: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise PhotoDataError(f"'{cmd[0]}' not found: fetching the wallpaper packages needs Debian's apt-get and "
                             f"dpkg (or pass a folder of the .deb files with --deb-dir)") from None


def _deb_version(path: str) -> tuple[str, str]:
    out = _run(["dpkg-deb", "-f", path, "Package", "Version"])
    if out.returncode:
        raise PhotoDataError(f"{path}: not a readable .deb: {out.stderr.strip()}")
    fields = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    return fields.get("Package", ""), fields.get("Version", "")


def _find_deb(folder: str, package: Package) -> str | None:
    if not os.path.isdir(folder):
        return None
    for name in sorted(os.listdir(folder)):
        if name.startswith(package.name + "_") and name.endswith(".deb"):
            path = os.path.join(folder, name)
            if _deb_version(path) == (package.name, package.version):
                return path
    return None


def _apt_download(package: Package, folder: str, attempts: int = 30, wait: float = 10.0) -> str:
    """``apt-get download NAME=VERSION`` into ``folder``, retrying while another apt holds its lock."""
    os.makedirs(folder, exist_ok=True)
    for attempt in range(attempts):
        out = _run(["apt-get", "download", f"{package.name}={package.version}"], cwd=folder)
        if out.returncode == 0:
            break
        message = (out.stderr + out.stdout).strip()
        if "lock" in message.lower() and attempt + 1 < attempts:
            time.sleep(wait)
            continue
        if "not found" in message.lower() or "unable to locate" in message.lower():
            policy = _run(["apt-cache", "madison", package.name]).stdout.strip()
            raise PhotoDataError(
                f"apt has no {package.name} {package.version}, the version the photo manifest pins "
                f"({MANIFEST_PATH}); apt offers: {policy or 'nothing (run apt-get update?)'}. If the package "
                f"changed, review its images and update the manifest (scripts/photo_manifest.py); or pass "
                f"the pinned .deb with --deb-dir") from None
        raise PhotoDataError(f"apt-get download {package.name}={package.version} failed: {message}")
    path = _find_deb(folder, package)
    if path is None:
        raise PhotoDataError(f"apt-get download {package.name}={package.version} left no matching .deb in {folder}")
    return path


def package_root(cache_dir: str, package: Package) -> str:
    """Where a package's files are (debian: its extracted tree in the cache; python: the site-packages folder)."""
    if package.source == "python":
        import importlib.util

        spec = importlib.util.find_spec(package.module)
        if spec is None or spec.origin is None:
            raise PhotoDataError(f"the photo manifest needs the Python package {package.name!r} (module "
                                 f"{package.module!r}): pip install {package.name}")
        return os.path.dirname(os.path.dirname(spec.origin))
    return os.path.join(cache_dir, "extracted", f"{package.name}_{package.version.replace(':', '%3a')}")


def fetch_packages(manifest: Manifest, cache_dir: str, deb_dir: str | None = None,
                   log=print) -> dict[str, str]:
    """Make every Debian package of the manifest available, extracted, under ``cache_dir``: ``{name: root}``.

    A package already extracted is kept; otherwise its .deb is taken from ``deb_dir`` or ``cache_dir/debs``, or
    downloaded with apt, checked against the manifest's version and sha256, and unpacked with ``dpkg -x`` into
    a temporary folder that is renamed into place when complete."""
    roots = {}
    for package in manifest.packages.values():
        if package.source != "debian":
            continue
        root = package_root(cache_dir, package)
        roots[package.name] = root
        if os.path.isdir(root):
            continue
        debs = os.path.join(cache_dir, "debs")
        deb = (_find_deb(deb_dir, package) if deb_dir else None) or _find_deb(debs, package)
        if deb is None:
            log(f"downloading {package.name} {package.version}")
            deb = _apt_download(package, debs)
        digest = sha256_file(deb)
        if digest != package.deb_sha256:
            raise PhotoDataError(f"{deb}: sha256 {digest} differs from the manifest's {package.deb_sha256} for "
                                 f"{package.name} {package.version}: the package was rebuilt; review its images "
                                 f"and update the manifest (scripts/photo_manifest.py)")
        os.makedirs(os.path.dirname(root), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".extract-", dir=os.path.dirname(root))
        try:
            out = _run(["dpkg", "-x", deb, tmp])
            if out.returncode:
                raise PhotoDataError(f"dpkg -x {deb} failed: {out.stderr.strip()}")
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"extracted {package.name} {package.version} -> {root}")
    return roots


# --- writing a data folder ------------------------------------------------------------------------------------

def check_photo(manifest: Manifest, photo: Photo, cache_dir: str, check_licence: bool = True) -> str:
    """The photo's file, after checking that it exists, its sha256 matches and (debian, ``check_licence``) the
    package's copyright file still gives the manifest's licence for it. Returns its path."""
    package = manifest.packages[photo.package]
    root = package_root(cache_dir, package)
    if package.source == "debian" and not os.path.isdir(root):
        raise PhotoDataError(f"{photo.package} {package.version} is not in the cache {cache_dir}: run "
                             f"`python -m klvae.train.default_model --prepare-data` first")
    path = os.path.join(root, photo.path)
    if not os.path.isfile(path):
        raise PhotoDataError(f"{photo.package} {package.version}: no file {photo.path} ({photo.name} in the "
                             f"manifest): the package changed; review it and update the manifest "
                             f"(scripts/photo_manifest.py)")
    digest = sha256_file(path)
    if digest != photo.sha256:
        raise PhotoDataError(f"{path}: sha256 {digest} differs from the manifest's {photo.sha256} ({photo.name}, "
                             f"{photo.package} {package.version}, installed version may differ): review the file "
                             f"and update the manifest (scripts/photo_manifest.py)")
    if package.source == "debian" and check_licence:
        with open(os.path.join(root, package.copyright), encoding="utf-8", errors="replace") as f:
            stanza = dep5_entry(f.read(), photo.path)
        licence = stanza["license"] if stanza else None
        if licence != photo.licence:
            raise PhotoDataError(f"{photo.package}: {package.copyright} gives {photo.path} the licence {licence!r}, "
                                 f"the manifest says {photo.licence!r}")
    return path


def downscale(image: np.ndarray, short_side: int) -> np.ndarray:
    """``image`` resized (Lanczos, antialiased) so its shorter side is ``short_side``; smaller images unchanged."""
    from PIL import Image

    h, w = image.shape[:2]
    if min(h, w) <= short_side:
        return image
    s = short_side / min(h, w)
    size = (short_side, round(h * s)) if w <= h else (round(w * s), short_side)
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def prepare_folder(manifest: Manifest, use: str, folder: str, cache_dir: str) -> list[str]:
    """Write the manifest's images of ``use`` into ``folder`` as ``NAME.png`` (verified, downscaled), skipping
    files already there; each file is written atomically, so concurrent callers (the ranks of a torchrun launch)
    are safe. Refuses a folder prepared from another manifest or holding images the manifest does not name."""
    from PIL import Image

    from klvae.fileio import atomic_write_bytes
    from klvae.train.data import list_images, load_rgb

    photos = manifest.select(use)
    if not photos:
        raise PhotoDataError(f"the photo manifest has no images for use {use!r}")
    os.makedirs(folder, exist_ok=True)
    stamp_path = os.path.join(folder, STAMP)
    stamp = {"manifest_sha256": manifest.digest, "use": use, "short_side": manifest.short_side}
    if os.path.exists(stamp_path):
        with open(stamp_path, encoding="utf-8") as f:
            old = json.load(f)
        if old != stamp:
            raise PhotoDataError(f"{folder} was prepared from another photo manifest or use ({old}); delete the "
                                 f"folder (or point the config elsewhere) to prepare it anew")
    expected = {os.path.join(folder, p.name + ".png") for p in photos}
    foreign = [p for p in list_images(folder) if p not in expected]
    if foreign:
        raise PhotoDataError(f"{folder} holds {len(foreign)} image(s) the photo manifest does not name, e.g. "
                             f"{foreign[0]}: the recipe trains on the manifest's images only; remove them")
    atomic_write_bytes(stamp_path, (json.dumps(stamp, indent=1) + "\n").encode())
    written = []
    for photo in photos:
        out = os.path.join(folder, photo.name + ".png")
        if os.path.exists(out):
            continue
        image = downscale(load_rgb(check_photo(manifest, photo, cache_dir)), manifest.short_side)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        atomic_write_bytes(out, buffer.getvalue())
        written.append(out)
    return written


def credits_markdown(manifest: Manifest, uses: Iterable[str] = ("train",)) -> str:
    """A Markdown table of the images of ``uses``: name, package, path, licence, credit."""
    lines = ["| image | package | path | licence | credit |", "|---|---|---|---|---|"]
    for p in manifest.photos:
        if p.use in uses:
            credit = p.credit.replace("|", "/").replace("\n", "; ")
            lines.append(f"| {p.name} | {p.package} | `{p.path}` | {p.licence} | {credit} |")
    return "\n".join(lines)
