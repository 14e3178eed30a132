"""Safety and errors: bad files raise typed errors naming the file and problem; pickled code never runs;
exports leave no partial files; only the VAE's tensors are read from a full checkpoint."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import save_file  # noqa: E402

import klvae  # noqa: E402
from klvae.errors import StateDictMismatchError, WeightsError  # noqa: E402
from klvae.weights.infer import AmbiguousConfigWarning  # noqa: E402

SD_LIKE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4)


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    """An original-layout SD-like VAE file (written by klvae's own export; the key map is tested elsewhere)."""
    path = str(tmp_path_factory.mktemp("good") / "vae.safetensors")
    torch.manual_seed(0)
    klvae.AutoencoderKL(**SD_LIKE).save_single_file(path)
    return path


def load(path, **kwargs):
    return klvae.AutoencoderKL.from_single_file(path, config=kwargs.pop("config", dict(SD_LIKE)), **kwargs)


def original_tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


# ---------------------------------------------------------------------- damaged files
def test_truncated_safetensors(tmp_path, good_file):
    data = open(good_file, "rb").read()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated") as info:
        load(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("damage", ["header_length", "header_json"])
def test_corrupt_safetensors(tmp_path, good_file, damage):
    data = bytearray(open(good_file, "rb").read())
    if damage == "header_length":
        data[:8] = (2**40).to_bytes(8, "little")
    else:
        data[8:20] = b"\xff\xfe garbage!"
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupt") as info:
        load(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["empty.safetensors", "empty.ckpt", "empty.bin"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(WeightsError, match=r"empty file \(0 bytes\)") as info:
        load(str(path))
    assert str(path) in str(info.value)


def test_missing_source_and_folder(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load(str(tmp_path / "nope.safetensors"))
    with pytest.raises(WeightsError, match="is a folder"):
        load(str(tmp_path))


# ---------------------------------------------------------------------- files without a (recognisable) VAE
def test_unet_only_checkpoint(tmp_path):
    path = str(tmp_path / "unet_only.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(8)}, path)
    with pytest.raises(WeightsError, match="no VAE weights") as info:
        load(path, config=None)
    assert path in str(info.value) and "sd1 model checkpoint without its VAE" in str(info.value)


def test_diffusers_unet_file(tmp_path):
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": torch.zeros(4)},
              path)
    with pytest.raises(WeightsError, match="no VAE weights"):
        load(path, config=None)


def test_shape_mismatch_names_the_keys(tmp_path, good_file):
    tensors = original_tensors(good_file)
    tensors["decoder.up.0.block.0.conv1.weight"] = torch.zeros(32, 32, 3, 3)  # should be (32, 64, 3, 3)
    path = str(tmp_path / "bad_shape.safetensors")
    save_file(tensors, path)
    for config in (None, dict(SD_LIKE)):
        with pytest.raises(StateDictMismatchError) as info, warnings.catch_warnings():
            warnings.simplefilter("ignore", AmbiguousConfigWarning)  # the SD1/SDXL guess, not under test here
            load(path, config=config)
        err = info.value
        assert path in str(err) and "decoder.up_blocks.1.resnets.0.conv1.weight" in err.mismatched


def test_missing_key(tmp_path, good_file):
    tensors = original_tensors(good_file)
    del tensors["encoder.mid.block_2.norm1.bias"]
    path = str(tmp_path / "missing.safetensors")
    save_file(tensors, path)
    with pytest.raises(StateDictMismatchError) as info:
        load(path)
    assert info.value.missing == ["encoder.mid_block.resnets.1.norm1.bias"]


@pytest.mark.parametrize("case", ["unknown_key", "mixed_layouts", "extra_top_level", "no_block_names"])
def test_unknown_layout(tmp_path, good_file, case):
    tensors = original_tensors(good_file)
    if case == "unknown_key":
        tensors["encoder.down.0.block.0.conv3.weight"] = torch.zeros(1)
    elif case == "mixed_layouts":
        tensors["encoder.down_blocks.0.resnets.0.conv1.weight"] = torch.zeros(1)
    elif case == "extra_top_level":
        tensors["text_model.embeddings.weight"] = torch.zeros(1)
    else:
        tensors = {"encoder.weight": torch.zeros(1), "decoder.weight": torch.zeros(1)}
    path = str(tmp_path / f"{case}.safetensors")
    save_file(tensors, path)
    with pytest.raises(WeightsError, match="unknown layout") as info:
        load(path)
    assert path in str(info.value)


def test_unknown_file_format(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_bytes(b"hello, this is not a checkpoint")
    with pytest.raises(WeightsError, match="unknown file format") as info:
        load(str(path))
    assert str(path) in str(info.value)


def test_pickle_that_is_not_a_dict(tmp_path):
    path = str(tmp_path / "list.pt")
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match="expected a dict of tensors"):
        load(path)


# ---------------------------------------------------------------------- pickles with code
class _Payload:
    """Unpickling this calls os.makedirs(marker): harmless, and visible if it ever ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw_pickle"])
def test_malicious_pickle_never_executes(tmp_path, fmt):
    marker = str(tmp_path / "pwned")
    obj = {"state_dict": {"encoder.conv_in.weight": torch.zeros(1), "evil": _Payload(marker)}}
    path = str(tmp_path / "evil.ckpt")
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(_Payload(marker), f, protocol=2)
    # the payload really is live: an unrestricted unpickler would run it
    with pytest.raises(WeightsError, match="refused to unpickle") as info:
        load(path, config=None)
    assert path in str(info.value)
    assert not os.path.exists(marker)
    out = str(tmp_path / "out.safetensors")
    from klvae.cli import main

    assert main(["convert", path, out]) == 2
    assert not os.path.exists(marker) and not os.path.exists(out)


def test_payload_is_live_under_plain_pickle(tmp_path):
    """Guard for the test above: the same bytes do run code through pickle.load, so refusing them matters."""
    marker = str(tmp_path / "ran")
    data = pickle.dumps(_Payload(marker), protocol=2)
    pickle.loads(data)
    assert os.path.isdir(marker)


# ---------------------------------------------------------------------- exports never leave partial files
def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    model = klvae.AutoencoderKL(**SD_LIKE)

    def fail_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail_midway)
    target = tmp_path / "out" / "vae.safetensors"
    with pytest.raises(OSError, match="disk full"):
        model.save_single_file(str(target))
    assert os.listdir(target.parent) == []
    with pytest.raises(WeightsError, match="unknown file type"):
        model.save_single_file(str(tmp_path / "vae.txt"))
    assert not (tmp_path / "vae.txt").exists()


# ---------------------------------------------------------------------- lazy reading of big checkpoints
def test_only_vae_tensors_are_read_from_a_full_checkpoint(tmp_path, good_file, monkeypatch):
    import safetensors

    vae = original_tensors(good_file)
    filler = {f"model.diffusion_model.block.{i}.weight": torch.ones(256, 1024) for i in range(8)}
    path = str(tmp_path / "full.safetensors")
    save_file({**filler, **{"first_stage_model." + k: v for k, v in vae.items()}}, path)

    requested: list[str] = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self._inner = real_open(*args, **kwargs)

        def __enter__(self):
            self._f = self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def get_tensor(self, key):
            requested.append(key)
            return self._f.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    model = load(path)
    assert sorted(requested) == sorted("first_stage_model." + k for k in vae)
    assert torch.equal(model.state_dict()["encoder.conv_in.weight"], vae["encoder.conv_in.weight"])
