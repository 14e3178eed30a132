"""The model side of the server: one AutoencoderKL on one device, run on whole batches from a worker thread."""

from __future__ import annotations

import os
from typing import Any

import torch

from klvae.latents import latent_scaling
from klvae.serve.errors import ServeError

OPS = ("decode", "encode")


class Engine:
    """Runs ``decode`` (latents -> images) and ``encode`` (images -> posterior mode) on batches.

    Inputs arrive on the CPU in any float dtype and are moved to the model's device and dtype; outputs come back
    to the CPU in the model's dtype. Calls are made from one worker thread at a time.
    """

    def __init__(self, model: Any, device: str | torch.device = "cpu", name: str = "model"):
        self.name = name  # what people and metrics call the model (its folder's name, or "default")
        self.model = model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.dtype: torch.dtype = model.dtype
        self.scaling = latent_scaling(model)  # its latent convention (FLUX.2's statistics come from the weights)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, device: str = "cpu", dtype: str = "float32",
                    tiling: bool = False, name: str | None = None) -> Engine:
        """Load a diffusers-layout model folder (``config.json`` + weights) of either class (AutoencoderKL or
        AutoencoderKLFlux2). Only local folders are accepted. ``name`` defaults to the folder's name."""
        from klvae.torch import auto
        from klvae.torch.state_dict import as_torch_dtype

        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise ServeError(f"{folder}: no such model folder (expected a diffusers AutoencoderKL folder with "
                             "config.json and diffusion_pytorch_model.safetensors)")
        try:
            torch_dtype = as_torch_dtype(dtype)
            torch.device(device)
        except (ValueError, RuntimeError) as e:
            raise ServeError(str(e)) from None
        model = auto.from_pretrained(folder, torch_dtype=torch_dtype)  # AutoencoderKL or AutoencoderKLFlux2
        if tiling:
            model.enable_tiling()
        try:
            return cls(model, device=device, name=name or os.path.basename(os.path.normpath(folder)))
        except (RuntimeError, AssertionError) as e:  # e.g. a CUDA device on a build or machine without one
            raise ServeError(f"cannot put the model on device {device!r}: {e}") from None

    @property
    def config(self):
        return self.model.config

    @property
    def factor(self) -> int:
        return self.model.config.downsample_factor

    def run(self, op: str, x: torch.Tensor) -> torch.Tensor:
        """``decode`` or ``encode`` one batch; blocking (call from a worker thread)."""
        with torch.inference_mode():
            x = x.to(self.device, self.dtype)
            if op == "decode":
                y = self.model.decode(x).sample
            elif op == "encode":
                y = self.model.encode(x).latent_dist.mode()
            else:
                raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
            return y.cpu()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config.to_dict(), "dtype": str(self.dtype).removeprefix("torch."),
                "device": str(self.device), "downsample_factor": self.factor,
                "parameters": self.model.num_parameters(), "tiling": bool(self.model.use_tiling)}
