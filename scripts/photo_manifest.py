"""Maintain src/klvae/train/photos.json when a wallpaper package changes (run from the repository root).

    python scripts/photo_manifest.py check [--cache-dir runs/photos/debian-cache]
        every image file of the fetched packages against the manifest: files the manifest does not list
        (to review), listed files that are gone, and files whose sha256 or licence differ
    python scripts/photo_manifest.py sheet PACKAGE OUT.png [--cache-dir ...]
        a contact sheet (numbered thumbnails) of a package's images, to decide by eye which are photographs

Fetch the packages first (`python -m klvae.train.default_model --prepare-data`, after bumping the manifest's
version and deb_sha256 when a package changed). Decisions are then written into the manifest by hand: use
(train / excluded with a note), licence as the copyright file gives it, credit, sha256.
"""

from __future__ import annotations

import argparse
import os
import sys

RASTER = (".jpg", ".jpeg", ".png", ".webp")


def package_images(root: str) -> list[str]:
    """Raster images in an extracted package, as paths relative to it (symlinks and previews left out)."""
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if name.lower().endswith(RASTER) and not os.path.islink(path) and not name.startswith("screenshot"):
                found.append(os.path.relpath(path, root))
    return sorted(found)


def check(cache_dir: str) -> int:
    from klvae.train.photos import PhotoDataError, check_photo, load_manifest, package_root

    manifest = load_manifest()
    problems = 0
    for package in manifest.packages.values():
        if package.source != "debian":
            continue
        root = package_root(cache_dir, package)
        if not os.path.isdir(root):
            print(f"{package.name} {package.version}: not fetched into {cache_dir}")
            problems += 1
            continue
        listed = {p.path for p in manifest.photos if p.package == package.name}
        for path in sorted(set(package_images(root)) - listed):
            print(f"{package.name}: not in the manifest, to review: {path}")
            problems += 1
    for photo in manifest.photos:
        try:
            check_photo(manifest, photo, cache_dir, check_licence=photo.use != "excluded")
        except PhotoDataError as e:
            print(e)
            problems += 1
    print(f"{problems} problem(s)")
    return 1 if problems else 0


def sheet(package_name: str, out: str, cache_dir: str, thumb: int = 240) -> int:
    from PIL import Image, ImageDraw

    from klvae.train.photos import load_manifest, package_root

    Image.MAX_IMAGE_PIXELS = None
    package = load_manifest().packages[package_name]
    root = package_root(cache_dir, package)
    paths = package_images(root)
    cols, cell_h = 5, thumb * 2 // 3 + 14
    canvas = Image.new("RGB", (cols * thumb, max(1, -(-len(paths) // cols)) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, rel in enumerate(paths):
        with Image.open(os.path.join(root, rel)) as im:
            im.draft("RGB", (2 * thumb, 2 * thumb))
            im = im.convert("RGB")
            im.thumbnail((thumb - 4, thumb * 2 // 3))
        x, y = (i % cols) * thumb, (i // cols) * cell_h
        canvas.paste(im, (x + 2, y + 14))
        draw.text((x + 2, y + 1), f"{i} {rel[-30:]}", fill="black")
        print(i, rel)
    canvas.save(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=os.path.join("runs", "photos", "debian-cache"))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check")
    p = sub.add_parser("sheet")
    p.add_argument("package")
    p.add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(args.cache_dir)
    return sheet(args.package, args.out, args.cache_dir)


if __name__ == "__main__":
    sys.exit(main())
