"""The PyTorch trainer on tiny configs: config files, datasets, loss going down, exact resume, options, CLI."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from klvae.errors import ConfigError
from klvae.train.config import TrainConfig, load_train_config
from klvae.train.data import DatasetError, ImageFolder, list_images

TINY_MODEL = {"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
              "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 4, "layers_per_block": 1,
              "sample_size": 16}


def _write_images(root, n=4, size=(40, 48), seed=0):
    """Smooth random colour images (PNG, JPEG and WebP, in nested folders)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    exts = [".png", ".jpg", ".webp"]
    for i in range(n):
        yy, xx = np.mgrid[0:size[0], 0:size[1]] / 10.0
        phase = rng.uniform(0, 6, 3)
        img = np.stack([np.sin(xx * (c + 1) * 0.7 + yy * 0.5 + phase[c]) for c in range(3)], -1)
        img = ((img * 0.5 + 0.5) * 255).astype(np.uint8)
        folder = os.path.join(root, f"sub{i % 2}", "deeper" if i % 3 == 0 else "")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(img).save(os.path.join(folder, f"img{i}{exts[i % 3]}"))


def _config(tmp_path, **sections) -> TrainConfig:
    data_dir = tmp_path / "data"
    if not data_dir.exists():
        _write_images(str(data_dir))
    base = {
        "model": {"preset": "tiny", "config": dict(TINY_MODEL)},
        "data": {"train_dir": str(data_dir), "val_dir": str(data_dir), "crop_size": 16, "batch_size": 2,
                 "val_size": 32},
        "optim": {"lr": 3e-3, "max_steps": 4},
        "loss": {"kl_weight": 1e-6},
        "train": {"output_dir": str(tmp_path / "run"), "progress": False, "log_every": 1, "val_every": 1000,
                  "sample_every": 1000, "checkpoint_every": 1000, "num_threads": 1},
    }
    for name, changes in sections.items():
        base[name].update(changes)
    return TrainConfig.from_dict(base)


# ---------------------------------------------------------------------- config and data
def test_toml_config_relative_paths_and_errors(tmp_path):
    (tmp_path / "cfg.toml").write_text('[data]\ntrain_dir = "imgs"\ncrop_size = 64\n[optim]\nbetas = [0.5, 0.9]\n'
                                       '[train]\noutput_dir = "out"\n')
    c = load_train_config(tmp_path / "cfg.toml")
    assert c.data.train_dir == str(tmp_path / "imgs") and c.train.output_dir == str(tmp_path / "out")
    assert c.data.crop_size == 64 and c.optim.betas == (0.5, 0.9)
    (tmp_path / "bad.toml").write_text("[data]\ncrop_sise = 64\n")
    with pytest.raises(ConfigError, match="crop_sise"):
        load_train_config(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig.from_dict({"optim": {"schedule": "linear"}})
    with pytest.raises(ConfigError, match="no such config"):
        load_train_config(tmp_path / "missing.toml")
    from klvae.train.config import dump_train_config
    assert TrainConfig.from_dict(__import__("tomllib").loads(dump_train_config(c))) == c


def test_toml_config_base_chain_merges_sections_and_resolves_paths_per_file(tmp_path, monkeypatch):
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "base.toml").write_text(
        '[model]\npreset = "tiny"\n[data]\ntrain_dir = "imgs"\ncrop_size = 64\nbatch_size = 8\n'
        '[optim]\nlr = 1e-4\nmax_steps = 100\n[loss]\nchroma_weight = 3.0\n[train]\noutput_dir = "run1"\n')
    (tmp_path / "stage2.toml").write_text(
        'base = "stage1/base.toml"\n[model]\npretrained = "./v4"\n[data]\ncrop_size = 256\n'
        '[optim]\nlr = 3e-5\n[train]\noutput_dir = "run2"\n')
    c = load_train_config(tmp_path / "stage2.toml")
    # Paths relative to the file that set them; the child's [model] replaces the base's (no preset + pretrained).
    assert c.data.train_dir == str(tmp_path / "stage1" / "imgs") and c.train.output_dir == str(tmp_path / "run2")
    assert c.model.preset is None and c.model.pretrained == str(tmp_path / "v4")
    # Other sections merge key by key: changed keys from the child, the rest from the base, not the defaults.
    assert (c.data.crop_size, c.data.batch_size, c.optim.lr, c.optim.max_steps) == (256, 8, 3e-5, 100)
    assert c.loss.chroma_weight == 3.0
    # Overrides (command-line flags) are relative to the working directory.
    monkeypatch.chdir(tmp_path / "stage1")
    c = load_train_config(tmp_path / "stage2.toml", {"train": {"output_dir": "flag"}})
    assert c.train.output_dir == str(tmp_path / "stage1" / "flag")
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_train_config(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('base = "nowhere.toml"\n')
    with pytest.raises(ConfigError, match=r"nowhere\.toml: no such config file \(the base of"):
        load_train_config(tmp_path / "c.toml")


def test_image_folder_nested_formats_bad_files_and_determinism(tmp_path):
    _write_images(str(tmp_path), n=3)
    (tmp_path / "sub0" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "notes.txt").write_text("not an image")
    assert len(list_images(str(tmp_path))) == 4
    with pytest.warns(UserWarning, match="broken.png"):
        ds = ImageFolder(str(tmp_path), 16, batch_size=3, seed=1, min_scale=0.5, channel_shuffle=True)
    assert len(ds) == 3
    b = ds.batch(5, rank=0)
    assert b.shape == (3, 3, 16, 16) and b.dtype == np.float32 and -1 <= b.min() and b.max() <= 1
    assert np.array_equal(b, ds.batch(5, rank=0))
    assert not np.array_equal(b, ds.batch(5, rank=1)) and not np.array_equal(b, ds.batch(6, rank=0))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no images"):
        ImageFolder(str(empty), 16, batch_size=1)


def test_grey_weight_and_color_jitter(tmp_path):
    from PIL import Image

    grey = np.tile(np.linspace(20, 230, 32, dtype=np.uint8)[None, :, None], (32, 1, 3))
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[..., 0] = 200  # pure red
    for name, img in (("grey_a.png", grey), ("grey_b.png", grey), ("grey_c.png", grey), ("red.png", colour)):
        Image.fromarray(img).save(tmp_path / name)

    def grey_share(ds, steps=150):
        crops = np.concatenate([ds.batch(s) for s in range(steps)])
        return float(np.mean([np.array_equal(c[0], c[1]) and np.array_equal(c[0], c[2]) for c in crops]))

    assert abs(grey_share(ImageFolder(str(tmp_path), 16, batch_size=4)) - 0.75) < 0.06      # uniform: 3 of 4
    down = ImageFolder(str(tmp_path), 16, batch_size=4, grey_weight=1 / 3)                 # 3 x 1/3 against 1
    assert abs(grey_share(down) - 0.5) < 0.06
    assert grey_share(ImageFolder(str(tmp_path), 16, batch_size=4, grey_weight=0)) == 0
    (tmp_path / "only_grey").mkdir()
    Image.fromarray(grey).save(tmp_path / "only_grey" / "g.png")
    with pytest.raises(DatasetError, match="grey_weight is 0"):
        ImageFolder(str(tmp_path / "only_grey"), 16, batch_size=1, grey_weight=0)

    jittered = ImageFolder(str(tmp_path), 16, batch_size=4, color_jitter=0.5, grey_weight=1e6)  # grey crops only
    crops = np.concatenate([jittered.batch(s) for s in range(20)])                            # (N, 3, H, W) in [-1, 1]
    assert crops.min() >= -1 and crops.max() <= 1 and np.array_equal(crops, np.concatenate(
        [jittered.batch(s) for s in range(20)]))
    # Each channel is gain * grey + offset with gain in [0.5, 1]: tinted (channels differ), ramp kept (monotone).
    assert all(not np.array_equal(c[0], c[1]) for c in crops)
    # Any 16-pixel window of the linear ramp spans the same range, so each channel's range is gain * that range.
    plain = ImageFolder(str(tmp_path / "only_grey"), 16, batch_size=1).batch(0)[0, 0]
    ratio = np.ptp(crops, axis=(2, 3)) / np.ptp(plain)
    assert ratio.min() >= 0.5 - 0.02 and ratio.max() <= 1 + 0.02


def test_saturation_boost_scales_chroma_and_keeps_grey(tmp_path):
    from PIL import Image

    olive = np.zeros((32, 32, 3), np.uint8)
    olive[:] = (140, 110, 80)                      # grey 110, chroma (+30, 0, -30): no clipping up to 2x
    Image.fromarray(olive).save(tmp_path / "olive.png")
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "grey.png")
    boosted = ImageFolder(str(tmp_path), 16, batch_size=8, saturation_boost=1.0)
    crops = np.concatenate([boosted.batch(s) for s in range(10)]) * 127.5 + 127.5      # back to 8-bit levels
    assert np.array_equal(crops, np.concatenate([boosted.batch(s) for s in range(10)]) * 127.5 + 127.5)
    grey_crops = [c for c in crops if np.allclose(c[0], c[1]) and np.allclose(c[1], c[2])]
    assert grey_crops and all(np.allclose(c, 90, atol=0.5) for c in grey_crops)   # grey stays grey and unchanged
    colour = np.array([c[:, 0, 0] for c in crops if not np.allclose(c[0], c[1])])  # (N, 3) levels
    factors = (colour[:, 0] - colour[:, 2]) / 60.0                                  # R - B was 60
    assert np.allclose(colour.mean(axis=1), 110, atol=1)                            # the grey level is kept
    assert factors.min() >= 1 - 0.02 and factors.max() <= 2 + 0.02 and np.ptp(factors) > 0.3
    assert np.allclose(colour[:, 1], 110, atol=1)                                   # G was on the grey level
    with pytest.raises(ConfigError, match="saturation_boost"):
        TrainConfig.from_dict({"data": {"saturation_boost": -0.5}})


def test_posterior_logvar_init_both_backends(tmp_path):
    from klvae.torch.train.trainer import build_model

    base = build_model(_config(tmp_path))
    low = build_model(_config(tmp_path, model={"posterior_logvar_init": -6.0}))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        logvar_base = base.encode(x).latent_dist.logvar
        logvar_low = low.encode(x).latent_dist.logvar
    # Same seed, so only the bias moved: the log-variance shifts by exactly (-6 - old bias) per channel.
    shift = (-6.0 - base.quant_conv.bias[4:]).view(1, -1, 1, 1)
    assert torch.allclose(logvar_low, logvar_base + shift, atol=1e-5)
    assert torch.equal(low.quant_conv.bias[:4], base.quant_conv.bias[:4])

    jax = pytest.importorskip("jax")
    from klvae.flax.train.trainer import init_params
    from klvae.weights.flax import flax_to_canonical

    params = init_params(low.config, 0, -6.0)
    theirs = flax_to_canonical(jax.device_get(params), low.config)
    np.testing.assert_array_equal(np.asarray(theirs["quant_conv.bias"]), low.quant_conv.bias.detach().numpy())
    np.testing.assert_array_equal(np.asarray(theirs["encoder.conv_in.weight"]),
                                  low.encoder.conv_in.weight.detach().numpy())


# ---------------------------------------------------------------------- training
def test_loss_goes_down(tmp_path):
    from klvae.torch.train.trainer import Trainer

    one = tmp_path / "one"
    _write_images(str(one), n=1, size=(18, 18))           # nearly a fixed batch: the tiny model can fit it
    t = Trainer(_config(tmp_path, data={"train_dir": str(one), "val_dir": None}, optim={"max_steps": 30}),
                resume=False)
    losses = [t.train_step()["nll"] for _ in range(30)]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_resume_continues_the_same_loss_curve(tmp_path):
    from klvae.torch.train.trainer import Trainer

    cfg = _config(tmp_path, optim={"max_steps": 6, "warmup_steps": 2, "schedule": "cosine"},
                  train={"checkpoint_every": 3, "ema_decay": 0.9})
    full = Trainer(cfg, resume=False)
    curve = [full.train_step()["loss"] for _ in range(6)]
    run = Trainer(cfg.replace(train={"output_dir": str(tmp_path / "run2")}), resume=False)
    run.fit(3)                                           # checkpoints at step 3
    assert os.path.isfile(tmp_path / "run2" / "checkpoints" / "step-000000003.pt")
    resumed = Trainer(cfg.replace(train={"output_dir": str(tmp_path / "run2")}))
    assert resumed.step == 3
    rest = [resumed.train_step()["loss"] for _ in range(3)]
    assert rest == curve[3:]                             # bit-identical
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert all(torch.equal(v, resumed.ema.shadow[k]) for k, v in full.ema.shadow.items())


def test_fit_writes_metrics_samples_and_validation(tmp_path):
    from klvae.torch.train.trainer import Trainer

    cfg = _config(tmp_path, optim={"max_steps": 4}, train={"val_every": 2, "sample_every": 4, "log_every": 2})
    Trainer(cfg).fit()
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    val = [r for r in records if "val_psnr" in r]
    assert len(val) == 2 and all(5 < r["val_psnr"] < 60 and -1 < r["val_ssim"] <= 1 for r in val)
    assert (run / "samples" / "step-000000004.png").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000000004.pt"
    assert (run / "config.toml").is_file()


def test_decoder_only_accumulation_checkpointing_gan(tmp_path):
    from klvae.torch.train.trainer import Trainer

    cfg = _config(tmp_path, model={"train_decoder_only": True, "gradient_checkpointing": True},
                  optim={"grad_accum": 2, "max_steps": 3, "grad_clip": 1.0}, data={"crop_size": [16, 32]},
                  loss={"disc_start": 1, "disc_channels": 8, "disc_layers": 2})
    t = Trainer(cfg, resume=False)
    enc = {k: v.clone() for k, v in t.model.encoder.state_dict().items()}
    dec = {k: v.clone() for k, v in t.model.decoder.state_dict().items()}
    disc = {k: v.clone() for k, v in t.loss.discriminator.state_dict().items()}
    logs = [t.train_step() for _ in range(3)]
    assert "d_loss" not in logs[0] and "d_loss" in logs[1] and logs[2]["d_weight"] > 0
    assert all(torch.equal(v, t.model.encoder.state_dict()[k]) for k, v in enc.items())
    assert any(not torch.equal(v, t.model.decoder.state_dict()[k]) for k, v in dec.items())
    assert any(not torch.equal(v, t.loss.discriminator.state_dict()[k]) for k, v in disc.items())
    assert t.model.is_gradient_checkpointing


def test_gradient_accumulation_matches_big_batch(tmp_path, monkeypatch):
    """Two accumulated micro-batches of 2 crops give the update of one batch of those 4 crops."""
    from klvae.torch.outputs import DiagonalGaussianDistribution
    from klvae.torch.train.trainer import Trainer

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    a = Trainer(_config(tmp_path, optim={"grad_accum": 2}), resume=False)
    b = Trainer(_config(tmp_path, data={"batch_size": 4}, train={"output_dir": str(tmp_path / "b")}), resume=False)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    b.data.batch = lambda step, rank=0: np.concatenate([a.data.batch(2 * step), a.data.batch(2 * step + 1)])
    grads = {}
    for name, t in (("a", a), ("b", b)):                 # record the gradients the optimiser is given
        step = t.opt.step
        t.opt.step = lambda name=name, t=t, step=step: (grads.__setitem__(name, [p.grad.clone() for p in
                                                                               t.model.parameters()]), step())
    la, lb = a.train_step(), b.train_step()
    assert la["loss"] == pytest.approx(lb["loss"], rel=1e-5)
    ga = torch.cat([g.flatten() for g in grads["a"]])
    gb = torch.cat([g.flatten() for g in grads["b"]])
    assert float((ga - gb).norm() / gb.norm()) < 1e-5


def test_mixed_crop_sizes_weigh_every_pixel_the_same(tmp_path, monkeypatch):
    """crop_size = [8, 16], batch 2, grad_accum 2: micro-batch 0 has 8 crops of 8 pixels, micro-batch 1 has 2 of
    16, and the step's gradient is that of the squared error summed over all pixels / 4 (+ the KL likewise)."""
    from klvae.torch.outputs import DiagonalGaussianDistribution
    from klvae.torch.train.trainer import Trainer

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    t = Trainer(_config(tmp_path, data={"crop_size": [8, 16], "batch_size": 2}, optim={"grad_accum": 2},
                        loss={"l1_weight": 0.0, "l2_weight": 1.0, "kl_weight": 1e-2}), resume=False)
    batches = [torch.from_numpy(t.data.batch(i)) for i in range(2)]
    assert [tuple(b.shape) for b in batches] == [(8, 3, 8, 8), (2, 3, 16, 16)]
    assert [t.data.loss_scale(i) for i in range(3)] == [4.0, 1.0, 4.0]
    reference = copy.deepcopy(t.model)
    objective = 0
    for x in batches:                                     # by hand: every pixel and latent element weighs 1 / 4
        posterior = reference.encode(x).latent_dist
        objective = objective + ((x - reference.decode(posterior.mode()).sample).square().sum()
                                 + 1e-2 * posterior.kl().sum()) / 4
    objective.backward()
    recorded = {}
    step = t.opt.step
    t.opt.step = lambda: (recorded.__setitem__("grads", [p.grad.clone() for p in t.model.parameters()]), step())
    t.train_step()
    got = torch.cat([g.flatten() for g in recorded["grads"]])
    want = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert float((got - want).norm() / want.norm()) < 1e-5
    with pytest.raises(ConfigError, match="divide the largest"):
        _config(tmp_path, data={"crop_size": [24, 64]})
    with pytest.raises(DatasetError, match="divide the largest"):
        ImageFolder(str(tmp_path / "data"), (12, 16), batch_size=1)


def test_train_cli_and_eval_cli(tmp_path, capsys):
    from klvae.cli import main

    data = tmp_path / "data"
    _write_images(str(data))
    (tmp_path / "cfg.toml").write_text(
        '[model]\npreset = "tiny"\n[data]\ntrain_dir = "data"\ncrop_size = 16\nbatch_size = 2\n'
        '[optim]\nmax_steps = 2\n[train]\noutput_dir = "run"\nprogress = false\nlog_every = 1\n')
    assert main(["train", str(tmp_path / "cfg.toml"), "--export", str(tmp_path / "exported")]) == 0
    from klvae.torch.model import AutoencoderKL
    model = AutoencoderKL.from_pretrained(str(tmp_path / "exported"))
    assert model.config.block_out_channels == (8, 16)
    capsys.readouterr()
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "exported"), str(data), "--lpips", "no", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "PSNR" in text and "+-" in text and "img0.png" in text
    result = json.loads(out_json.read_text())
    assert len(result["images"]) == 4 and result["summary"]["psnr"]["mean"] > 0
    # A run folder (its latest checkpoint) evaluates the same weights as the export (EMA off).
    assert main(["eval", str(tmp_path / "run"), str(data), "--lpips", "no", "--json", str(tmp_path / "e2.json")]) == 0
    again = json.loads((tmp_path / "e2.json").read_text())
    assert again["summary"]["psnr"]["mean"] == pytest.approx(result["summary"]["psnr"]["mean"], abs=1e-4)


def test_metrics_match_skimage():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from klvae.torch.train.metrics import psnr, ssim

    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (2, 3, 40, 36))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    for i in range(2):
        ref_p = peak_signal_noise_ratio(a[i], b[i], data_range=1.0)
        ref_s = structural_similarity(a[i].transpose(1, 2, 0), b[i].transpose(1, 2, 0), data_range=1.0,
                                      channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
        assert float(psnr(ta, tb)[i]) == pytest.approx(ref_p, abs=1e-4)
        assert float(ssim(ta, tb)[i]) == pytest.approx(ref_s, abs=1e-5)


@pytest.mark.parametrize("layout", ["folder", "single_file"])
def test_finetune_from_pretrained(tmp_path, layout):
    """[model] pretrained: a diffusers folder or a single file; training starts from exactly those weights."""
    from klvae.torch.model import AutoencoderKL
    from klvae.torch.train.trainer import Trainer

    torch.manual_seed(3)
    source = AutoencoderKL(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_MODEL.items()})
    if layout == "folder":
        path = tmp_path / "vae"
        source.save_pretrained(str(path))
    else:
        path = tmp_path / "vae.safetensors"
        source.save_single_file(str(path))
    cfg = _config(tmp_path, model={"preset": None, "config": {}, "pretrained": str(path),
                                   "train_decoder_only": True})
    t = Trainer(cfg, resume=False)
    assert all(torch.equal(v, t.model.state_dict()[k]) for k, v in source.state_dict().items())
    t.train_step()
    assert all(torch.equal(v, t.model.encoder.state_dict()[k]) for k, v in source.encoder.state_dict().items())


def test_bf16_autocast_step_close_to_fp32(tmp_path):
    from klvae.torch.train.trainer import Trainer

    losses = {}
    for precision in ("fp32", "bf16"):
        t = Trainer(_config(tmp_path, train={"precision": precision, "output_dir": str(tmp_path / precision)}),
                    resume=False)
        losses[precision] = t.train_step()["loss"]
        assert all(p.dtype == torch.float32 for p in t.model.parameters())     # weights stay fp32
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
