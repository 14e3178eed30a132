"""`klvae serve` with FLUX.2's VAE, through diffusers' own remote client over real HTTP: raw latents, the
transformer's normalised latents (patchified, and packed as Flux2Pipeline's output_type="latent" returns them)."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
remote_utils = pytest.importorskip("diffusers.utils.remote_utils")

from conftest import rel_err  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline  # noqa: E402
from test_flux2 import ASYMMETRIC, flux2_pair  # noqa: E402

import klvae  # noqa: E402
from klvae.serve import Engine, ServerThread, ServeSettings, create_app  # noqa: E402

remote_decode = remote_utils.remote_decode


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    _, ours = flux2_pair(ASYMMETRIC, seed=31)
    folder = tmp_path_factory.mktemp("flux2") / "vae"
    ours.save_pretrained(folder)
    server = ServerThread(create_app(Engine.from_folder(folder), ServeSettings())).start()
    yield server, ours
    server.stop()


def _decode(model, z):
    with torch.inference_mode():
        return model.decode(z).sample


def test_raw_and_normalised_latents_decode_as_the_pipeline_would(served):
    server, model = served
    z = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(1))       # raw latents of a 12x16 image
    expected = _decode(model, z)
    normalised = klvae.scale_latents(z, model)                                     # (2, 16, 3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the client's do_scaling deprecation
        raw = remote_decode(f"{server.url}/decode", z, output_type="pt", return_type="pt")
        patched = remote_decode(f"{server.url}/decode", normalised, output_type="pt", return_type="pt")
        # the client sends a tensor's storage as it lies: the pipeline's latents are contiguous, a fresh view is not
        tokens = Flux2Pipeline._pack_latents(normalised).contiguous()             # (2, 12, 16)
        packed = remote_decode(f"{server.url}/decode", tokens, output_type="pt", return_type="pt", height=12, width=16)
    for out in (raw, patched, packed):
        assert out.shape == (2, 3, 12, 16) and rel_err(out, expected) < 1e-5
    response = remote_utils.requests.post(f"{server.url}/decode", params={
        "shape": [1, 4, 6, 8], "dtype": "float32", "output_type": "pt", "scaling_factor": "0.5"},
        data=torch.zeros(1, 4, 6, 8).numpy().tobytes(), timeout=30)
    assert response.status_code == 400 and "FLUX.2" in response.json()["error"]
