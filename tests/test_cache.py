"""``klvae cache``: buckets, dataset readers, latents equal the model's own, index rows, resume bookkeeping."""

from __future__ import annotations

import io
import json
import math
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from conftest import saved_model_fixtures

from klvae.cache import shards as sh
from klvae.cache.buckets import BucketError, load_into_bucket, make_buckets, place
from klvae.cache.sources import DatasetError, expand_braces, list_samples
from klvae.cli import main

FIELDS = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1)
SIZES = [(20, 20), (12, 30), (30, 13), (17, 25), (40, 40), (9, 9), (25, 17), (16, 32), (33, 21), (14, 14)]
BUCKET_ARGS = ["--resolution", "24", "--bucket-step", "8", "--max-aspect", "2"]


model_dir, model = saved_model_fixtures(FIELDS, seed=3)


def make_images(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``(name, PNG/JPEG bytes)`` of small images of varied aspect ratios."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        fmt = "JPEG" if i % 3 == 2 else "PNG"
        Image.fromarray(a).save(buf, format=fmt)
        out.append((f"img{i:03d}.{'jpg' if fmt == 'JPEG' else 'png'}", buf.getvalue()))
    return out


def write_folder(root, images, nested: bool = True) -> None:
    for i, (name, data) in enumerate(images):
        sub = root / ("sub" if nested and i % 4 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / name).write_bytes(data)


def expected_latents(model, data: bytes, flip: bool = False) -> torch.Tensor:
    buckets = make_buckets(24, 8, 2.0)
    x, _, _ = load_into_bucket(io.BytesIO(data), buckets, 3, "test")
    x = torch.from_numpy(x)[None]
    if flip:
        x = x.flip(-1)
    with torch.no_grad():
        return model.encode(x).latent_dist.mean[0]


def read_tensor(out_dir, row, key="key") -> torch.Tensor:
    with safe_open(os.path.join(out_dir, row["shard"]), framework="pt") as f:
        return f.get_tensor(row[key])


# ---------------------------------------------------------------------------------------------- buckets
def test_buckets_respect_area_step_and_aspect():
    buckets = make_buckets(64, 8, 2.0)
    assert (64, 64) in buckets and buckets == sorted(set(buckets))
    for h, w in buckets:
        assert h % 8 == 0 and w % 8 == 0 and h * w <= 64 * 64 and max(h / w, w / h) <= 2.0
    assert {(w, h) for h, w in buckets} == set(buckets)  # both orientations
    assert make_buckets(64, 8, 2.0, aspect_buckets=False) == [(64, 64)]
    with pytest.raises(BucketError, match="multiple of --bucket-step"):
        make_buckets(60, 8, 2.0)


def test_placement_covers_the_bucket_and_centres_the_crop():
    buckets = make_buckets(64, 8, 2.0)
    p = place(300, 600, buckets)                      # 2:1 landscape -> the bucket nearest 2:1
    assert p.bucket == min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - math.log(2))) == (48, 80)
    assert p.resized[0] >= p.bucket[0] and p.resized[1] >= p.bucket[1]
    assert p.crop == ((p.resized[0] - p.bucket[0]) // 2, (p.resized[1] - p.bucket[1]) // 2)
    q = place(100, 100, buckets)
    assert q.bucket == (64, 64) and q.resized == (64, 64) and q.crop == (0, 0)
    r = place(1000, 10, buckets)                      # beyond max aspect: tallest bucket, cropped
    assert r.bucket[0] / r.bucket[1] == max(b[0] / b[1] for b in buckets)


def test_load_into_bucket_honours_exif_and_alpha():
    a = np.zeros((10, 20, 4), np.uint8)
    a[..., 3] = 0                                     # fully transparent -> white
    im = Image.fromarray(a, "RGBA")
    exif = im.getexif()
    exif[0x0112] = 6                                  # displayed rotated: 10 wide, 20 tall
    buf = io.BytesIO()
    im.save(buf, format="PNG", exif=exif)
    x, p, size = load_into_bucket(io.BytesIO(buf.getvalue()), make_buckets(24, 8, 2.0), 3, "t")
    assert size == (20, 10) and p.bucket[0] > p.bucket[1] and x.shape == (3, *p.bucket)
    np.testing.assert_allclose(x, 1.0)


# ---------------------------------------------------------------------------------------------- sources
def test_folder_ids_and_tar_keys(tmp_path):
    write_folder(tmp_path / "ds", make_images(5))
    (tmp_path / "ds" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "ds" / "notes.txt").write_text("x")
    ids = [s.id for s in list_samples([str(tmp_path / "ds")])]
    assert ids == ["img001", "img002", "img003", "sub/img000", "sub/img004"]

    shard = tmp_path / "shard-0001.tar"
    with tarfile.open(shard, "w") as tar:
        for i, (name, data) in enumerate(make_images(3)):
            for member, payload in ((f"k{i}/{i:04d}.{name.split('.')[1]}", data),
                                    (f"k{i}/{i:04d}.json", b"{}")):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    samples = list_samples([str(tmp_path / "shard-{0001..0001}.tar")])
    assert [s.id for s in samples] == ["k0/0000", "k1/0001", "k2/0002"]
    assert samples[1].read_bytes() == make_images(3)[1][1]
    assert expand_braces("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    with pytest.raises(DatasetError, match="two images have the id"):
        list_samples([str(shard), str(shard)])
    (tmp_path / "x.tar.gz").write_bytes(b"")
    with pytest.raises(DatasetError, match="compressed shards"):
        list_samples([str(tmp_path / "x.tar.gz")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        list_samples([str(tmp_path / "empty")])


# ---------------------------------------------------------------------------------------------- end to end
def test_cache_latents_index_flip_and_failures(tmp_path, model_dir, model, capsys):
    images = make_images(10)
    write_folder(tmp_path / "ds", images)
    (tmp_path / "ds" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "cache"
    assert main(["cache", str(tmp_path / "ds"), "-o", str(out), "-m", model_dir, *BUCKET_ARGS, "--flip", "--moments",
                 "--batch-size", "3", "--shard-size", "4", "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "10 images in the index" in err and "1 unreadable" in err

    rows = sh.read_index(str(out))
    by_name = {name.split(".")[0]: data for name, data in images}
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows) and len(rows) == 10
    for row in rows:
        data = by_name[row["id"].split("/")[-1]]
        h, w = Image.open(io.BytesIO(data)).size[::-1]
        p = place(h, w, make_buckets(24, 8, 2.0))
        assert row["source_size"] == [h, w] and row["bucket"] == list(p.bucket) and row["resized"] == list(p.resized)
        assert row["crop"] == [p.crop[0], p.crop[1], *p.bucket]
        assert row["latent_shape"] == [4, p.bucket[0] // 2, p.bucket[1] // 2]
        torch.testing.assert_close(read_tensor(out, row), expected_latents(model, data), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(read_tensor(out, row, "flip_key"), expected_latents(model, data, flip=True),
                                   rtol=1e-5, atol=1e-6)
        assert read_tensor(out, row, "logvar_key").shape == read_tensor(out, row).shape
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failed] == ["broken"]
    manifest = json.loads((out / "cache.json").read_text())
    assert manifest["flip"] is True and manifest["buckets"] == [list(b) for b in make_buckets(24, 8, 2.0)]
    with safe_open(str(out / rows[0]["shard"]), framework="np") as f:
        assert json.loads(f.metadata()["klvae_latents"])["scaled"] is False

    # a second run has nothing to do; different settings are refused; --force starts over
    assert main(["cache", str(tmp_path / "ds"), "-o", str(out), "-m", model_dir, *BUCKET_ARGS, "--flip",
                 "--moments"]) == 0
    assert "this run encoded 0 in 0 shard(s)" in capsys.readouterr().err
    assert main(["cache", str(tmp_path / "ds"), "-o", str(out), "-m", model_dir, *BUCKET_ARGS]) == 2
    assert "holds a cache made with different flip, moments" in capsys.readouterr().err
    assert main(["cache", str(tmp_path / "ds"), "-o", str(out), "-m", model_dir, *BUCKET_ARGS, "--force", "-q",
                 "--scaled", "--save-dtype", "fp16"]) == 0
    rows = sh.read_index(str(out))
    assert len(rows) == 10 and "flip_key" not in rows[0]
    z = read_tensor(out, rows[0])
    assert z.dtype == torch.float16
    expected = expected_latents(model, by_name[rows[0]["id"].split("/")[-1]]) * model.config.scaling_factor
    torch.testing.assert_close(z.float(), expected, rtol=2e-3, atol=2e-3)


def test_tar_shards_give_the_same_latents_as_folders(tmp_path, model_dir, model):
    images = make_images(6, seed=5)
    for k in range(2):
        with tarfile.open(tmp_path / f"part-{k}.tar", "w") as tar:
            for name, data in images[k * 3:(k + 1) * 3]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert main(["cache", str(tmp_path / "part-{0..1}.tar"), "-o", str(tmp_path / "c"), "-m", model_dir, "-q",
                 *BUCKET_ARGS, "--no-aspect-buckets"]) == 0
    rows = sh.read_index(str(tmp_path / "c"))
    assert [r["id"] for r in rows] == [n.split(".")[0] for n, _ in images]
    assert all(r["bucket"] == [24, 24] for r in rows)
    assert rows[0]["source"].endswith("part-0.tar:img000.png")
    buckets = [(24, 24)]
    for row, (_, data) in zip(rows, images):
        x, _, _ = load_into_bucket(io.BytesIO(data), buckets, 3, "t")
        with torch.no_grad():
            expected = model.encode(torch.from_numpy(x)[None]).latent_dist.mean[0]
        torch.testing.assert_close(read_tensor(tmp_path / "c", row), expected, rtol=1e-5, atol=1e-6)


def test_restart_quarantines_corrupt_shards_and_removes_temporaries(tmp_path, model_dir, capsys):
    write_folder(tmp_path / "ds", make_images(8))
    out = tmp_path / "cache"
    args = ["cache", str(tmp_path / "ds"), "-o", str(out), "-m", model_dir, *BUCKET_ARGS, "--shard-size", "2", "-q"]
    assert main(args) == 0
    first = {r["id"]: r for r in sh.read_index(str(out))}
    shard_files = sorted(os.listdir(out / "shards"))
    victim = out / "shards" / shard_files[1]
    lost = {r["id"] for r in sh.read_shard_rows(str(victim))}
    victim.write_bytes(victim.read_bytes()[:100])                   # e.g. a disk error after the rename
    (out / "shards" / ".00000-000099.safetensors.abc.tmp").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="moved unreadable shard aside"):
        assert main(args) == 0
    rows = sh.read_index(str(out))
    assert sorted(r["id"] for r in rows) == sorted(first) and len(rows) == 8
    assert {r["id"] for r in rows if r["shard"] not in {f"shards/{n}" for n in shard_files}} == lost
    assert os.listdir(out / "shards" / "corrupt") == [victim.name]
    assert not [n for n in os.listdir(out / "shards") if n.endswith(".tmp")]


def test_strict_and_bad_options(tmp_path, model_dir, capsys):
    write_folder(tmp_path / "ds", make_images(2))
    (tmp_path / "ds" / "broken.jpg").write_bytes(b"nope")
    assert main(["cache", str(tmp_path / "ds"), "-o", str(tmp_path / "c"), "-m", model_dir, *BUCKET_ARGS,
                 "--strict", "-q"]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg: UnidentifiedImageError" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c" / "index.jsonl").exists()
    assert main(["cache", str(tmp_path / "ds"), "-o", str(tmp_path / "d"), "-m", model_dir, "--resolution", "16",
                 "--bucket-step", "3"]) == 2
    assert "must be a multiple of the model's factor 2" in capsys.readouterr().err
    (tmp_path / "notcache").mkdir()
    (tmp_path / "notcache" / "precious.txt").write_text("keep")
    assert main(["cache", str(tmp_path / "ds"), "-o", str(tmp_path / "notcache"), "-m", model_dir, *BUCKET_ARGS,
                 "--force"]) == 2
    assert "is not a latent cache" in capsys.readouterr().err
    assert (tmp_path / "notcache" / "precious.txt").read_text() == "keep"
