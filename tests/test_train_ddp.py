"""Data parallel training under torchrun: two CPU processes (gloo) stay in sync and checkpoint once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from test_train import _write_images

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from klvae.train.config import load_train_config
    from klvae.torch.train.trainer import Trainer

    with Trainer(load_train_config(sys.argv[1])) as t:  # close() destroys the process group it created
        logs = t.fit()
        flat = torch.cat([p.detach().flatten() for p in t.model.parameters()])
        disc = torch.cat([p.detach().flatten() for p in t.loss.discriminator.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(2)]
        dist.all_gather(gathered, flat)
        dgathered = [torch.zeros_like(disc) for _ in range(2)]
        dist.all_gather(dgathered, disc)
        batch = torch.from_numpy(t.data.batch(0, t.rank))
        batches = [torch.zeros_like(batch) for _ in range(2)]
        dist.all_gather(batches, batch)
    assert not dist.is_initialized()
    if t.rank == 0:
        with open(sys.argv[2], "w") as f:
            json.dump({"world": t.world_size, "step": t.step, "d_loss": logs.get("d_loss"),
                       "params_equal": bool(torch.equal(gathered[0], gathered[1])),
                       "disc_equal": bool(torch.equal(dgathered[0], dgathered[1])),
                       "batches_differ": not torch.equal(batches[0], batches[1])}, f)
""")


def test_torchrun_two_processes_gloo(tmp_path):
    _write_images(str(tmp_path / "data"))
    (tmp_path / "train.py").write_text(SCRIPT)
    (tmp_path / "cfg.toml").write_text(textwrap.dedent("""
        [model]
        preset = "tiny"
        [data]
        train_dir = "data"
        crop_size = 16
        batch_size = 2
        [optim]
        max_steps = 3
        [loss]
        disc_start = 1
        disc_channels = 8
        disc_layers = 2
        [train]
        output_dir = "run"
        progress = false
        checkpoint_every = 3
        num_threads = 1
        """))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "train.py"), str(tmp_path / "cfg.toml"), str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["world"] == 2 and out["step"] == 3
    assert out["params_equal"] and out["disc_equal"]          # DDP reduced the gradients: replicas agree
    assert out["batches_differ"]                              # each process trains on its own crops
    assert out["d_loss"] is not None                          # the GAN was on (steps 1 and 2)
    ckpts = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert ckpts == ["latest", "step-000000003.pt"]
