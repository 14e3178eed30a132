"""``klvae cache`` under torchrun on 2 CPU processes (gloo): disjoint rank slices and one merged index, equal to
what one process makes."""

from __future__ import annotations

import subprocess

import torch

from klvae.cache import shards as sh
from klvae.cli import main
from test_cache import expected_latents, make_images, model, model_dir, read_tensor, write_folder
from test_cache_resume import ENV, _cache_cmd, _check_index, _torchrun

__all__ = ["model", "model_dir"]  # fixtures shared with test_cache


def test_torchrun_two_ranks_take_disjoint_slices_and_merge_one_index(tmp_path, model_dir, model):
    images = make_images(12, seed=9)
    write_folder(tmp_path / "ds", images, nested=False)
    out = tmp_path / "cache"
    result = subprocess.run(_torchrun(2) + _cache_cmd(tmp_path / "ds", out, model_dir, "--flip"), env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _check_index(out, images, model)
    ids = [r["id"] for r in rows]  # the sorted sample list both ranks slice
    for row in rows:
        rank = int(row["shard"].split("/")[1][:5])
        assert ids.index(row["id"]) % 2 == rank
        by_id = {n.split(".")[0]: d for n, d in images}
        torch.testing.assert_close(read_tensor(out, row, "flip_key"),
                                   expected_latents(model, by_id[row["id"]], flip=True),
                                   rtol=1e-5, atol=1e-6)
    # the same cache made by one process has the same index rows (shards aside)
    single = tmp_path / "single"
    assert main(_cache_cmd(tmp_path / "ds", single, model_dir, "--flip")) == 0
    strip = [{k: v for k, v in r.items() if k != "shard"} for r in sh.read_index(str(single))]
    assert strip == [{k: v for k, v in r.items() if k != "shard"} for r in rows]
