"""``klvae cache`` killed (SIGKILL) mid-run, twice, then finished by a restart on two torchrun ranks: every image
is encoded exactly once, no shard is ever corrupt, and the merged index's latents equal the model's own."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

from klvae.cache import shards as sh
from test_cache import BUCKET_ARGS, expected_latents, make_images, model, model_dir, read_tensor, write_folder

__all__ = ["model", "model_dir"]  # fixtures shared with test_cache

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cache_cmd(ds, out, model_dir, *extra):
    return ["cache", str(ds), "-o", str(out), "-m", model_dir, *BUCKET_ARGS, "--batch-size", "2", "--shard-size",
            "2", "--workers", "2", "-q", *extra]


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "klvae.cli"]


def _shards(out) -> list[str]:
    folder = out / "shards"
    return sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")) if folder.is_dir() else []


def _check_shards_whole_and_disjoint(out) -> set[str]:
    """Every shard reads completely (header, listed tensors) and no id is in two shards; returns the ids."""
    seen: dict[str, str] = {}
    for name in _shards(out):
        for row in sh.read_shard_rows(str(out / "shards" / name)):
            assert row["id"] not in seen, f"{row['id']} in {seen.get(row['id'])} and {name}"
            seen[row["id"]] = name
    return set(seen)


def _check_index(out, images, model):
    rows = sh.read_index(str(out))
    assert sorted(r["id"] for r in rows) == sorted(n.split(".")[0] for n, _ in images)
    assert sum(len(sh.read_shard_rows(str(out / "shards" / n))) for n in _shards(out)) == len(images)
    by_id = {n.split(".")[0]: data for n, data in images}
    for row in rows:
        torch.testing.assert_close(read_tensor(out, row), expected_latents(model, by_id[row["id"]]), rtol=1e-5,
                                   atol=1e-6)
    assert not [n for n in os.listdir(out / "shards") if n.endswith(".tmp")]
    return rows


def test_killed_twice_then_finished_by_two_ranks(tmp_path, model_dir, model):
    images = make_images(60, seed=7)
    write_folder(tmp_path / "ds", images, nested=False)
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "klvae.cli", *_cache_cmd(tmp_path / "ds", out, model_dir)]
    done_before = 0
    for kill_after in (2, 5):  # kill once a few more shards exist than before
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while len(_shards(out)) < done_before + kill_after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.kill()
        proc.wait()
        assert proc.returncode == -9, proc.stderr.read().decode()[-2000:]
        ids = _check_shards_whole_and_disjoint(out)
        assert done_before < len(ids) < len(images) and not (out / "index.jsonl").exists()
        done_before = len(_shards(out))
    # restart with a different world size: two ranks share out what is left
    result = subprocess.run(_torchrun(2) + _cache_cmd(tmp_path / "ds", out, model_dir), env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_shards_whole_and_disjoint(out)
    _check_index(out, images, model)
    assert {n[:5] for n in _shards(out)} == {"00000", "00001"}
