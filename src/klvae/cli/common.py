"""What the image subcommands share: model options and loading, a backend-neutral runner, outputs, inputs.

A :class:`Runner` hides the backend: it takes and returns numpy arrays (NCHW float32), so encode, decode,
roundtrip and cache are written once for PyTorch and Flax. Progress bars live in :mod:`klvae.progress` and the
latent-file format in :mod:`klvae.latentfile`, below both the command line and the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

from klvae.cli.options import DTYPES
from klvae.config import AutoencoderKLConfig
from klvae.errors import KLVAEError
from klvae.latents import LatentScaling, latent_scaling

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DEFAULT_MODEL_NAME = "default"

T = TypeVar("T")


class CLIError(KLVAEError):
    """Bad command-line input: a missing file, an output in the way, an option the backend cannot honour."""


# ---------------------------------------------------------------------------------------------- the model
def default_model() -> str:
    """The bundled default model's folder (``klvae.DEFAULT_MODEL``), checked to be installed."""
    import klvae

    path = getattr(klvae, "DEFAULT_MODEL", None)
    if path is None or not os.path.isfile(os.path.join(os.fspath(path), "config.json")):
        where = f" (nothing at {os.fspath(path)})" if path is not None else ""
        raise CLIError(f"the bundled default model is not installed{where}; pass --model (a diffusers folder, "
                       "single file or hub repo id)")
    return os.fspath(path)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    kind: str     # "folder", "file" (single file or hub file URL) or "hub" (repo id)
    location: str
    name: str     # as the user named it (recorded in output metadata)


def model_source(arg: str | None) -> ModelSource:
    """Where ``--model`` points, checked before anything heavy is imported."""
    if arg is None:
        return ModelSource("folder", default_model(), DEFAULT_MODEL_NAME)
    if os.path.isdir(arg):
        return ModelSource("folder", arg, arg)
    if os.path.isfile(arg):
        return ModelSource("file", arg, arg)
    from klvae.weights.sources import parse_hub_url

    if parse_hub_url(arg) is not None:
        return ModelSource("file", arg, arg)
    parts = arg.split("/")
    if len(parts) == 2 and all(parts) and not arg.startswith((".", "~")) and not arg.endswith(SINGLE_FILE_SUFFIXES):
        return ModelSource("hub", arg, arg)
    raise CLIError(f"--model {arg}: no such file or folder (and not a hub repo id such as org/name)")


class Runner:
    """A loaded model behind numpy in, numpy out. Subclasses implement one backend."""

    config: AutoencoderKLConfig
    scaling: LatentScaling  # the model's latent convention (FLUX.2's comes from its weights)
    source: ModelSource
    backend: str
    dtype: str      # float32, float16 or bfloat16
    device: str

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, C, H, W) float32 in [-1, 1] -> the posterior's (mean, logvar), each (B, c, h, w) float32."""
        raise NotImplementedError

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(B, c, h, w) raw latents -> (B, C, H, W) float32 images (in [-1, 1] up to model error)."""
        raise NotImplementedError

    @property
    def factor(self) -> int:
        return self.config.downsample_factor

    def pixel_multiple(self, scaled: bool) -> int:
        """What image sides must be multiples of: the model's factor, times FLUX.2's latent patch when scaled."""
        patch = self.scaling.patch_size if scaled else None
        return self.factor * (patch[0] if patch else 1)

    writes = True  # whether this process writes output files (in a distributed run, rank 0 alone)

    def describe(self) -> str:
        return f"{self.source.name} ({self.backend}, {self.dtype}, {self.device})"


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, source: ModelSource, dtype: str, device: str, tiling: str | None, model_config: str | None):
        import torch

        from klvae.torch import auto

        self.torch = torch
        self.source = source
        self.device = _torch_device(device)
        torch_dtype = getattr(torch, DTYPES[dtype])
        if source.kind == "file":
            model = auto.from_single_file(source.location, config=model_config, torch_dtype=torch_dtype)
        else:
            _no_config_for_folders(model_config)
            model = auto.from_pretrained(source.location, torch_dtype=torch_dtype)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.config = model.config
        self.scaling = latent_scaling(model)
        self.dtype = DTYPES[dtype]
        if tiling is not None:
            from klvae.tiling import DEFAULT_MODE, DISTRIBUTED_MODE
            from klvae.torch.tiling import MODES

            mode = DEFAULT_MODE if tiling == "default" else tiling
            if mode not in MODES:
                raise CLIError(f"--tiling {tiling}: unknown mode; choose one of {', '.join(MODES)}")
            if mode == DISTRIBUTED_MODE:
                self.writes = _join_ranks(self.device)
            self.model.enable_tiling(mode)

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(self.device, self.model.dtype)
            dist = self.model.encode(x).latent_dist
            return _np(dist.mean), _np(dist.logvar)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            z = torch.from_numpy(np.ascontiguousarray(latents, np.float32)).to(self.device, self.model.dtype)
            return _np(self.model.decode(z).sample)


def _join_ranks(device) -> bool:
    """Join the torchrun job's default process group (gloo on CPU, NCCL on CUDA; left at exit); True on rank 0,
    the one rank that writes output files."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise CLIError("--tiling distributed shares each image over the processes of a torchrun job; launch with "
                       "torchrun --nproc-per-node N -m klvae.cli ... (in one process, use --tiling exact: the same "
                       "result)")
    from klvae.torch.distributed_tiling import join_default_group

    return join_default_group(device) == 0


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _torch_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"--device {name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available here")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    return device


def _no_config_for_folders(model_config: str | None) -> None:
    if model_config is not None:
        raise CLIError("--config applies to single-file models only (folders and hub repos carry config.json)")


class FlaxRunner(Runner):
    backend = "flax"

    def __init__(self, source: ModelSource, dtype: str, device: str, tiling: str | None, model_config: str | None):
        try:
            import jax
            import jax.numpy as jnp

            from klvae.flax import FlaxAutoencoderKL, auto
        except ImportError as e:
            raise CLIError(f"--backend flax needs jax and flax (pip install 'klvae[flax]'): {e}") from None
        self.jax = jax
        self.source = source
        self.dtype = DTYPES[dtype]
        self.device = _jax_device(jax, device)
        jdtype = getattr(jnp, self.dtype)
        options = dict(dtype=jdtype, param_dtype=jdtype)
        if source.kind == "file":
            model, params = auto.from_single_file(source.location, config=model_config, **options)
        else:
            _no_config_for_folders(model_config)
            model, params = auto.from_pretrained(source.location, **options)
        mode = None
        if tiling is not None:
            mode = "blend" if tiling == "default" else tiling
            try:
                model = model.with_tiling(mode)
            except (ValueError, KLVAEError) as e:
                raise CLIError(f"--tiling {tiling} with --backend flax: {e}") from None
        self.model = model
        self.config = model.config
        self.scaling = latent_scaling(model, params)
        self.params = jax.device_put(params, self.device)

        def encode(p, x):
            dist = model.apply({"params": p}, x, method=FlaxAutoencoderKL.encode).latent_dist
            return dist.mean, dist.logvar

        def decode(p, z):
            return model.apply({"params": p}, z, method=FlaxAutoencoderKL.decode).sample

        # "exact" and "auto" tiling run their own eager executor (with jitted pieces inside); only the plain and
        # "blend" paths are traced whole.
        traced = mode in (None, "blend")
        self._encode, self._decode = (jax.jit(encode), jax.jit(decode)) if traced else (encode, decode)

    def _put(self, a: np.ndarray):
        return self.jax.device_put(np.ascontiguousarray(a, np.float32), self.device)

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, logvar = self._encode(self.params, self._put(images))
        return np.asarray(mean, np.float32), np.asarray(logvar, np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return np.asarray(self._decode(self.params, self._put(latents)), np.float32)


def _jax_device(jax, name: str):
    if name == "auto":
        return jax.devices()[0]
    platform, _, index = name.partition(":")
    platform = {"cuda": "gpu"}.get(platform, platform)
    try:
        devices = jax.devices(platform)
        return devices[int(index or 0)]
    except (RuntimeError, ValueError, IndexError) as e:
        raise CLIError(f"--device {name}: no such JAX device ({e})") from None


def load_runner(args: argparse.Namespace) -> Runner:
    """The model the options name, loaded on its backend and device."""
    source = model_source(args.model)
    cls = TorchRunner if args.backend == "torch" else FlaxRunner
    try:
        runner = cls(source, args.dtype, args.device, args.tiling, args.model_config)
    except (ValueError, TypeError) as e:  # e.g. an unknown --config preset raised as ValueError by a lower layer
        if isinstance(e, KLVAEError):
            raise
        raise CLIError(f"--model {source.name}: {e}") from None
    if not runner.writes:  # the other ranks of a distributed run say nothing
        args.quiet = True
    return runner


# ---------------------------------------------------------------------------------------------- outputs
def check_outputs(paths: Iterable[str], force: bool) -> None:
    """Refuse to overwrite (before any work is done) unless ``force``; a folder is never replaced by a file."""
    paths = list(paths)
    if len(set(paths)) != len(paths):
        seen: set[str] = set()
        dup = next(p for p in paths if p in seen or seen.add(p))
        raise CLIError(f"{dup}: two inputs would write the same output; give them different names")
    for path in paths:
        if os.path.isdir(path):
            raise CLIError(f"{path}: is a folder; cannot write a file there")
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise CLIError(f"{existing[0]}: already exists{more}; pass --force to overwrite")


def unique_stems(paths: list[str]) -> list[str]:
    """Output base names for inputs: the file stem, with the parent folder prepended where stems collide."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    out = []
    for p, s in zip(paths, stems):
        if stems.count(s) > 1:
            parent = os.path.basename(os.path.dirname(os.path.abspath(p)))
            s = f"{parent}-{s}"
        out.append(s)
    return out


def note(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------- inputs
def expand_inputs(inputs: list[str], is_wanted, what: str) -> list[str]:
    """Files as given, folders replaced by their wanted files (sorted, not recursive); missing paths are errors."""
    out: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, n) for n in os.listdir(item)
                           if is_wanted(n) and not n.startswith(".") and os.path.isfile(os.path.join(item, n)))
            if not found:
                raise CLIError(f"{item}: a folder with no {what} in it")
            out.extend(found)
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise CLIError(f"{item}: no such file or folder")
    return out


def check_images_readable(paths: list[str]) -> None:
    """Open every image's header (cheap), so a bad input fails before the model loads or anything is written."""
    from klvae.images import ImageError, pillow

    Image = pillow()
    for path in paths:
        try:
            with Image.open(path) as im:
                w, h = im.size
        except Exception as e:  # Pillow raises many kinds
            raise ImageError(f"{path}: cannot read as an image ({type(e).__name__}: {e})") from None
        if w == 0 or h == 0:
            raise ImageError(f"{path}: the image is empty ({w}x{h})")


def batches_by_shape(items: Iterable[T], shape_of, batch_size: int) -> Iterator[list[T]]:
    """Group items of equal ``shape_of(item)`` into batches of up to ``batch_size``, keeping few in memory."""
    pending: dict[Any, list[T]] = {}
    for item in items:
        group = pending.setdefault(shape_of(item), [])
        group.append(item)
        if len(group) >= batch_size:
            yield pending.pop(shape_of(item))
    yield from pending.values()
