"""The default model's photo manifest: parsing, verification, the data folders it writes, and the package fetch,
on a fake package built in the test (no network, no apt)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from klvae.train import photos
from klvae.train.photos import PhotoDataError, dep5_entry, load_manifest, parse_manifest, prepare_folder

COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: fake

Files: *
Copyright: 2020 Someone
License: GPL-2+

Files: 16.04/lake_by_A.jpg
Copyright: A. Photographer, 2018
License: CC-BY-4.0

Files: abstract/*.png
Copyright: 2014 Artist
  2015 Another
License: CC-BY-SA-4.0
 Long licence text that is not the licence name.
 .
 More text.

License: GPL-2+
 The GPL text.
"""


def _photo(rng: np.random.Generator, h: int, w: int, fmt: str, path: str) -> bytes:
    from PIL import Image

    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([(xx * 255 // w), (yy * 255 // h), rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
    Image.fromarray(image).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    with open(path, "rb") as f:
        return f.read()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake(tmp_path):
    """A cache holding one extracted Debian package (two photographs, one abstract image) and its manifest."""
    cache = tmp_path / "cache"
    root = cache / "extracted" / "fake-wallpapers_1.0-1"
    (root / "usr/share/backgrounds/abstract").mkdir(parents=True)
    (root / "usr/share/doc/fake-wallpapers").mkdir(parents=True)
    (root / "usr/share/doc/fake-wallpapers/copyright").write_text(COPYRIGHT)
    rng = np.random.default_rng(0)
    lake = _photo(rng, 300, 500, "JPEG", str(root / "usr/share/backgrounds/lake_by_A.jpg"))
    tree = _photo(rng, 40, 30, "PNG", str(root / "usr/share/backgrounds/tree.png"))
    art = _photo(rng, 50, 50, "PNG", str(root / "usr/share/backgrounds/abstract/swirl.png"))
    manifest = {
        "short_side": 64,
        "packages": {"fake-wallpapers": {"source": "debian", "version": "1.0-1", "deb_sha256": "0" * 64,
                                         "copyright": "usr/share/doc/fake-wallpapers/copyright"}},
        "photos": [
            {"name": "lake", "package": "fake-wallpapers", "path": "usr/share/backgrounds/lake_by_A.jpg",
             "use": "train", "sha256": _sha(lake), "licence": "CC-BY-4.0", "credit": "A. Photographer"},
            {"name": "tree", "package": "fake-wallpapers", "path": "usr/share/backgrounds/tree.png",
             "use": "heldout", "sha256": _sha(tree), "licence": "GPL-2+"},
            {"name": "swirl", "package": "fake-wallpapers", "path": "usr/share/backgrounds/abstract/swirl.png",
             "use": "excluded", "sha256": _sha(art), "licence": "CC-BY-SA-4.0", "note": "abstract art"},
        ],
    }
    path = tmp_path / "photos.json"
    path.write_text(json.dumps(manifest))
    return {"cache": str(cache), "root": root, "manifest": manifest, "path": str(path), "tmp": tmp_path}


def test_dep5_last_matching_stanza_and_flattened_install_paths():
    # The source tree's 16.04/lake_by_A.jpg is installed flat under usr/share/backgrounds.
    assert dep5_entry(COPYRIGHT, "usr/share/backgrounds/lake_by_A.jpg")["license"] == "CC-BY-4.0"
    entry = dep5_entry(COPYRIGHT, "usr/share/backgrounds/abstract/swirl.png")
    assert entry["license"] == "CC-BY-SA-4.0" and entry["copyright"] == "2014 Artist\n2015 Another"
    assert dep5_entry(COPYRIGHT, "usr/share/backgrounds/other.jpg")["license"] == "GPL-2+"       # Files: *
    assert dep5_entry("Files: a.png\nLicense: X\n", "usr/b.png") is None


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["photos"][0].pop("sha256"), "photos[0]: missing key 'sha256'"),
    (lambda m: m["photos"][0].update(colour="red"), "unknown key(s) colour"),
    (lambda m: m["photos"][0].update(use="maybe"), "use: must be one of train, heldout, excluded"),
    (lambda m: m["photos"][1].update(name="lake"), "not unique: 'lake'"),
    (lambda m: m["photos"][2].update(note=""), "an excluded image needs a 'note'"),
    (lambda m: m["photos"][0].update(package="other"), "'other' is not listed under 'packages'"),
    (lambda m: m["photos"][0].update(sha256="ABC"), "not a lowercase hex sha256"),
    (lambda m: m["photos"][0].update(path="../x.jpg"), "must be relative inside the package"),
    (lambda m: m["packages"]["fake-wallpapers"].pop("copyright"), "a debian package needs 'copyright'"),
    (lambda m: m.update(short_side="640"), "'short_side' must be an integer"),
])
def test_manifest_errors_name_the_key(fake, edit, message):
    data = json.loads(json.dumps(fake["manifest"]))
    edit(data)
    with pytest.raises(PhotoDataError) as e:
        parse_manifest(data, "photos.json")
    assert message in str(e.value) and str(e.value).startswith("photos.json")


def test_prepare_writes_exactly_the_manifest_images_downscaled(fake):
    from PIL import Image

    from klvae.train.data import list_images, load_rgb

    manifest = load_manifest(fake["path"])
    train, held = str(fake["tmp"] / "train"), str(fake["tmp"] / "held")
    assert prepare_folder(manifest, "train", train, fake["cache"]) == [os.path.join(train, "lake.png")]
    prepare_folder(manifest, "heldout", held, fake["cache"])
    assert list_images(train) == [os.path.join(train, "lake.png")]          # the excluded image is not written
    assert list_images(held) == [os.path.join(held, "tree.png")]
    # 300x500 -> shorter side 64: 64x107 (Lanczos); 40x30 is below 64 and kept as it is.
    with Image.open(fake["root"] / "usr/share/backgrounds/lake_by_A.jpg") as im:
        expected = np.asarray(im.convert("RGB").resize((107, 64), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(load_rgb(os.path.join(train, "lake.png")), expected)
    with Image.open(fake["root"] / "usr/share/backgrounds/tree.png") as im:
        np.testing.assert_array_equal(load_rgb(os.path.join(held, "tree.png")), np.asarray(im.convert("RGB")))
    # Files already there are kept; a second call writes nothing.
    before = os.stat(os.path.join(train, "lake.png")).st_mtime_ns
    assert prepare_folder(manifest, "train", train, fake["cache"]) == []
    assert os.stat(os.path.join(train, "lake.png")).st_mtime_ns == before


def test_prepare_refuses_changed_files_licences_and_foreign_images(fake):
    manifest = load_manifest(fake["path"])
    lake = fake["root"] / "usr/share/backgrounds/lake_by_A.jpg"
    original = lake.read_bytes()
    lake.write_bytes(original + b"\0")
    with pytest.raises(PhotoDataError, match=r"lake_by_A.jpg: sha256 .* differs from the manifest's .*fake-wallpapers "
                       r"1.0-1"):
        prepare_folder(manifest, "train", str(fake["tmp"] / "a"), fake["cache"])
    lake.write_bytes(original)
    copyright = fake["root"] / "usr/share/doc/fake-wallpapers/copyright"
    copyright.write_text(COPYRIGHT.replace("License: CC-BY-4.0", "License: CC-BY-NC-4.0"))
    with pytest.raises(PhotoDataError, match="gives usr/share/backgrounds/lake_by_A.jpg the licence 'CC-BY-NC-4.0'"):
        prepare_folder(manifest, "train", str(fake["tmp"] / "b"), fake["cache"])
    copyright.write_text(COPYRIGHT)
    # An image the manifest does not name in the folder is refused (the recipe trains on nothing else).
    folder = fake["tmp"] / "c"
    folder.mkdir()
    shutil.copy(lake, folder / "stray.jpg")
    with pytest.raises(PhotoDataError, match="does not name, e.g. .*stray.jpg"):
        prepare_folder(manifest, "train", str(folder), fake["cache"])
    os.remove(folder / "stray.jpg")
    prepare_folder(manifest, "train", str(folder), fake["cache"])
    # A folder prepared from another manifest (here: another downscale size) is refused.
    changed = dict(fake["manifest"], short_side=32)
    with pytest.raises(PhotoDataError, match="prepared from another photo manifest"):
        prepare_folder(parse_manifest(changed), "train", str(folder), fake["cache"])
    # A package missing from the cache names the command that fetches it.
    with pytest.raises(PhotoDataError, match="--prepare-data"):
        prepare_folder(manifest, "train", str(fake["tmp"] / "d"), str(fake["tmp"] / "empty-cache"))


@pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None, reason="needs dpkg")
def test_fetch_extracts_a_pinned_deb_and_checks_version_and_sha(fake, monkeypatch):
    # Build the fake package as a real .deb, then fetch it from a local folder into an empty cache.
    build = fake["tmp"] / "build"
    shutil.copytree(fake["root"], build)
    (build / "DEBIAN").mkdir()
    (build / "DEBIAN/control").write_text("Package: fake-wallpapers\nVersion: 1.0-1\nArchitecture: all\n"
                                          "Maintainer: t <t@example.org>\nDescription: test\n")
    debs = fake["tmp"] / "debs"
    debs.mkdir()
    deb = debs / "fake-wallpapers_1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(build), str(deb)], check=True,
                   capture_output=True)
    calls = []

    def fake_apt(package, folder):                       # what apt says when the pinned version is gone
        calls.append(package.name)
        raise PhotoDataError(f"apt has no {package.name} {package.version}")

    monkeypatch.setattr(photos, "_apt_download", fake_apt)
    data = dict(fake["manifest"])
    data["packages"] = {"fake-wallpapers": dict(data["packages"]["fake-wallpapers"],
                                                deb_sha256=hashlib.sha256(deb.read_bytes()).hexdigest())}
    manifest = parse_manifest(data)
    cache = str(fake["tmp"] / "cache2")
    roots = photos.fetch_packages(manifest, cache, str(debs), log=lambda *_: None)
    assert calls == [] and roots["fake-wallpapers"] == photos.package_root(cache, manifest.packages["fake-wallpapers"])
    prepare_folder(manifest, "train", str(fake["tmp"] / "t"), cache)
    assert sorted(os.listdir(fake["tmp"] / "t")) == [".photos-manifest.json", "lake.png"]
    # A .deb whose bytes differ from the pinned sha256 is refused, and nothing is extracted.
    bad = parse_manifest(fake["manifest"])                                   # deb_sha256 "000..."
    with pytest.raises(PhotoDataError, match="differs from the manifest's 0000"):
        photos.fetch_packages(bad, str(fake["tmp"] / "cache3"), str(debs), log=lambda *_: None)
    assert not os.path.exists(photos.package_root(str(fake["tmp"] / "cache3"), bad.packages["fake-wallpapers"]))
    # Another version is not taken from the folder: apt is asked for the pinned one.
    data["packages"]["fake-wallpapers"]["version"] = "2.0-1"
    with pytest.raises(PhotoDataError, match="apt has no fake-wallpapers 2.0-1"):
        photos.fetch_packages(parse_manifest(data), str(fake["tmp"] / "cache4"), str(debs), log=lambda *_: None)
    assert calls == ["fake-wallpapers"]


def test_committed_manifest():
    manifest = load_manifest()
    by_use = {use: manifest.select(use) for use in photos.USES}
    assert {p.name for p in by_use["heldout"]} == {"skimage-camera", "skimage-chelsea", "skimage-coffee"}
    assert len(by_use["train"]) >= 50
    # Only the sources: scikit-image and the six Debian wallpaper packages; never evaluation packages.
    assert set(manifest.packages) == {"scikit-image", "mate-backgrounds", "lomiri-wallpapers-16.04",
                                      "lomiri-wallpapers-20.04", "ukui-wallpapers", "gnome-backgrounds",
                                      "plasma-workspace-wallpapers"}
    for p in by_use["train"]:
        assert p.licence and p.sha256
    train_sha = {p.sha256 for p in by_use["train"]}
    assert not train_sha & {p.sha256 for p in by_use["heldout"]}
    assert len(train_sha) == len(by_use["train"])                            # no image trained twice
    # The scikit-image entries are the installed files (checked without the network).
    pytest.importorskip("skimage")
    for p in manifest.photos:
        if p.package == "scikit-image":
            assert photos.check_photo(manifest, p, "unused-cache").endswith(p.path)


def test_prepare_data_of_the_recipe_uses_the_manifest(fake, tmp_path):
    from klvae.train.default_model import prepare_data

    counts = prepare_data(str(tmp_path / "train"), str(tmp_path / "held"), fake["cache"],
                          manifest_path=fake["path"], log=lambda *_: None)
    assert counts == {str(tmp_path / "train"): 1, str(tmp_path / "held"): 1}
    assert sorted(os.listdir(tmp_path / "held")) == [".photos-manifest.json", "tree.png"]


def test_model_card_credits_every_training_photograph():
    import klvae

    with open(os.path.join(klvae.DEFAULT_MODEL, "README.md"), encoding="utf-8") as f:
        card = f.read()
    section = card[card.index("## Training data"):]
    for p in load_manifest().select("train"):
        row = next((line for line in section.splitlines() if line.startswith(f"| {p.name} |")), None)
        assert row is not None, f"model card lacks a credit row for {p.name}"
        assert p.package in row
        if p.package != "plasma-workspace-wallpapers":         # plasma rows give both of its licence statements
            assert f"| {p.licence} |" in row


def test_apt_download_retries_on_the_lock_and_names_a_missing_version(monkeypatch, tmp_path):
    # apt itself is replaced: the first call finds the lock held, the second says the pinned version is gone.
    answers = [(100, "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 42 (apt-get)"),
               (100, "E: Version '9.9-1' for 'fake-wallpapers' was not found")]
    commands, sleeps = [], []

    def fake_run(cmd, cwd=None):
        commands.append(cmd[:2])
        if cmd[0] == "apt-cache":
            return subprocess.CompletedProcess(cmd, 0, "fake-wallpapers | 1.0-1 | http://deb.example bookworm/main", "")
        code, err = answers.pop(0)
        return subprocess.CompletedProcess(cmd, code, "", err)

    monkeypatch.setattr(photos, "_run", fake_run)
    monkeypatch.setattr(photos.time, "sleep", sleeps.append)
    package = photos.Package(name="fake-wallpapers", source="debian", version="9.9-1", copyright="c", deb_sha256="0")
    with pytest.raises(PhotoDataError) as e:
        photos._apt_download(package, str(tmp_path), wait=3.0)
    assert "apt has no fake-wallpapers 9.9-1" in str(e.value) and "apt offers: fake-wallpapers | 1.0-1" in str(e.value)
    assert commands == [["apt-get", "download"], ["apt-get", "download"], ["apt-cache", "madison"]]
    assert sleeps == [3.0]
