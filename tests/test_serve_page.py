"""The page at `GET /` and its `POST /roundtrip`: numbers checked against independent computations (numpy PSNR,
scikit-image SSIM, the model run locally), and the page itself driven in headless Chromium against a real
`klvae serve` (the bundled default model, with a token)."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")
Image = pytest.importorskip("PIL.Image")

from browser import Browser, chromium_binary  # noqa: E402
from conftest import TINY_CONFIGS, saved_model, wait_for_server  # noqa: E402

import klvae  # noqa: E402
from klvae.serve import Engine, ServerThread, ServeSettings, create_app  # noqa: E402
from klvae.torch.model import AutoencoderKL  # noqa: E402

TIMEOUT = 60
TOKEN = "page-token"
TOP_COLOUR, ZERO_COLOUR = (252, 255, 164), (0, 0, 4)  # the heat map's ends


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_model(tmp_path_factory, TINY_CONFIGS["two_blocks"], seed=11)


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerThread(create_app(Engine.from_folder(model_dir), ServeSettings(max_pixels=64 * 64))) as s:
        yield s


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def from_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def numpy_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2)
    return 10 * math.log10(1 / mse)


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    img = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1) * 0.4 + 0.5
    return np.clip((img + rng.normal(0, 0.03, img.shape)) * 255, 0, 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------- the page
def test_the_page_is_one_self_contained_file(server):
    r = requests.get(server.url + "/", timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html)  # nothing loaded from elsewhere
    assert not re.search(r"<(script|link)[^>]+(src|href)=", html)     # no external scripts or styles
    assert "https://" not in html and "http://" not in html
    for element in ('id="file-input"', 'id="psnr"', 'id="ssim"', 'id="latent-shape"', 'id="token-input"',
                    'name="viewport"', 'role="status"'):
        assert element in html


# ---------------------------------------------------------------------------------------------- /roundtrip
def test_roundtrip_matches_an_independent_computation(server, model_dir):
    from skimage.metrics import structural_similarity

    pixels = smooth_image(21, 31, seed=1)  # not multiples of the factor (2): padded, then cropped back
    r = requests.post(f"{server.url}/roundtrip", data=png_bytes(pixels), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    result = r.json()
    recon = from_data_url(result["reconstruction"])
    assert (result["width"], result["height"]) == (31, 21) and recon.shape == pixels.shape
    np.testing.assert_array_equal(from_data_url(result["original"]), pixels)
    # The model run here: mirror-pad to the factor, posterior mode, decode, crop, round.
    model = AutoencoderKL.from_pretrained(model_dir)
    padded = np.pad(pixels, ((0, 1), (0, 1), (0, 0)), mode="symmetric").astype(np.float32) / 255
    x = torch.from_numpy(padded).permute(2, 0, 1)[None] * 2 - 1
    with torch.inference_mode():
        z = model.encode(x).latent_dist.mode()
        y = model.decode(z).sample[0].permute(1, 2, 0).numpy()[:21, :31]
    expected = np.round(np.clip((y + 1) / 2, 0, 1) * 255).astype(np.uint8)
    assert np.abs(recon.astype(int) - expected).max() <= 1
    assert result["latent_shape"] == list(z.shape) == [1, 4, 11, 16]
    assert result["psnr"] == pytest.approx(numpy_psnr(pixels, recon), abs=1e-5)  # the server holds pixels as float32
    ssim = structural_similarity(pixels / 255, recon / 255, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, channel_axis=-1)
    assert result["ssim"] == pytest.approx(ssim, abs=1e-5)  # the server holds pixels as float32


def test_the_error_map_is_the_documented_colour_scale(server):
    pixels = smooth_image(24, 24, seed=2)
    r = requests.post(f"{server.url}/roundtrip", params={"error_scale": "0.5"}, data=png_bytes(pixels),
                      timeout=TIMEOUT)
    result = r.json()
    recon, heat = from_data_url(result["reconstruction"]), from_data_url(result["error_map"])
    assert heat.shape == pixels.shape and result["error_scale"] == 0.5
    # Mean absolute error over channels / error_scale, clipped to [0, 1], through the five anchor colours.
    t = np.clip(np.abs(pixels.astype(np.float64) - recon).mean(-1) / 255 / 0.5, 0, 1)
    assert 0 < t.min() and t.max() == 1  # both ends and the middle of the scale occur in this image
    anchors = np.array([ZERO_COLOUR, (87, 16, 110), (188, 55, 84), (249, 142, 9), TOP_COLOUR], np.float64)
    expected = np.stack([np.interp(t, np.linspace(0, 1, 5), anchors[:, c]) for c in range(3)], -1)
    assert np.abs(heat - expected).max() <= 1.0


@pytest.mark.parametrize("params, body, status, code", [
    ({}, b"not an image", 400, "bad_request"),
    ({}, b"", 400, "bad_request"),
    ({"error_scale": "0"}, None, 400, "bad_request"),
    ({"error_scale": "nan"}, None, 400, "bad_request"),
])
def test_roundtrip_refuses_bad_input(server, params, body, status, code):
    body = png_bytes(smooth_image(8, 8, 0)) if body is None else body
    r = requests.post(f"{server.url}/roundtrip", params=params, data=body, timeout=TIMEOUT)
    assert (r.status_code, r.json()["code"]) == (status, code)


def test_roundtrip_limits_and_token(model_dir, server):
    r = requests.post(f"{server.url}/roundtrip", data=png_bytes(smooth_image(80, 60, 0)), timeout=TIMEOUT)
    assert (r.status_code, r.json()["code"]) == (413, "too_large")
    assert requests.get(f"{server.url}/roundtrip", timeout=TIMEOUT).status_code == 405
    with ServerThread(create_app(Engine.from_folder(model_dir), ServeSettings(token=TOKEN))) as s:
        body = png_bytes(smooth_image(8, 8, 0))
        assert requests.post(f"{s.url}/roundtrip", data=body, timeout=TIMEOUT).status_code == 401
        assert requests.get(f"{s.url}/", timeout=TIMEOUT).status_code == 200  # the page itself is open
        ok = requests.post(f"{s.url}/roundtrip", data=body, headers={"Authorization": f"Bearer {TOKEN}"},
                           timeout=TIMEOUT)
        assert ok.status_code == 200


# ---------------------------------------------------------------------------------------------- in a browser
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chromium():
    binary = chromium_binary()
    if binary is None:
        if os.environ.get("KLVAE_REQUIRE_BROWSER"):
            pytest.fail("KLVAE_REQUIRE_BROWSER is set but no chromium binary was found")
        pytest.skip("no chromium binary (Debian's chromium package; .ci/run installs it)")
    return binary


@pytest.fixture(scope="module")
def cli_server():
    """`klvae serve` with no --model (the bundled default model) and a token, in a subprocess."""
    port = free_port()
    env = dict(os.environ, KLVAE_SERVE_TOKEN=TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "klvae.cli", "serve", "--port", str(port), "--log-level",
                             "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, "/ready", proc, 120)  # /ready is open to probes without the token
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_page_in_chromium(chromium, cli_server, tmp_path):
    from klvae.cli import main as klvae_main
    from klvae.latents import unscale_latents

    url, auth = cli_server, {"Authorization": f"Bearer {TOKEN}"}
    photo = np.asarray(Image.open(os.path.join(os.path.dirname(klvae.__file__), "data", "chelsea.png"))
                       .convert("RGB").resize((90, 60), Image.LANCZOS))
    image_path = tmp_path / "cat.png"
    image_path.write_bytes(png_bytes(photo))
    with Browser(chromium) as browser:
        page = browser.new_page(url + "/")
        # The API answers 401: the page asks for the token.
        page.wait_for("!document.getElementById('token-card').hidden")
        page.eval(f"document.getElementById('token-input').value = {TOKEN!r}; "
                  "document.getElementById('token-form').requestSubmit(); true")
        page.wait_for("document.body.dataset.state === 'idle'")
        assert page.eval("document.getElementById('model-name').textContent") == "default"
        assert "AutoencoderKL, KL-f8" in page.eval("document.getElementById('model-arch').textContent")
        with open(os.path.join(klvae.DEFAULT_MODEL, "config.json"), encoding="utf-8") as f:
            factor = json.load(f)["scaling_factor"]                # the bundled model's own latent scale
        assert page.eval("document.getElementById('model-convention').textContent") == f"z * {factor}"
        # The file chooser is reachable by keyboard (visually hidden, not removed from the focus order).
        assert page.eval("const i = document.getElementById('file-input'); i.focus(); document.activeElement === i")

        # An image: uploaded, encoded and decoded; the numbers shown are the server's and match numpy's.
        page.set_files("#file-input", [str(image_path)])
        state = page.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state")
        assert state == "done", page.eval("document.getElementById('status').textContent")
        shown_psnr = page.eval("document.getElementById('psnr').textContent")
        recon = from_data_url(page.eval("document.getElementById('reconstruction').src"))
        assert recon.shape == photo.shape
        server_psnr = requests.post(f"{url}/roundtrip", data=image_path.read_bytes(), headers=auth,
                                    timeout=TIMEOUT).json()["psnr"]
        assert shown_psnr == f"{server_psnr:.2f} dB"
        assert abs(float(shown_psnr.split()[0]) - numpy_psnr(photo, recon)) <= 0.005 + 1e-9
        assert page.eval("document.getElementById('latent-shape').textContent") == "1 × 4 × 8 × 12"
        assert page.eval("document.getElementById('image-size').textContent") == "90 × 60"
        assert page.eval("document.getElementById('error-map').naturalWidth") == 90

        # A latent file written by `klvae encode --scaled`: decoded, unscaled and cropped back to 90 x 60.
        latent_path = tmp_path / "cat.safetensors"
        assert klvae_main(["encode", str(image_path), "-o", str(latent_path), "--scaled", "-q"]) == 0
        page.set_files("#file-input", [str(latent_path)])
        page.wait_for("document.getElementById('decoded').src.startsWith('blob:')")
        state = page.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state")
        assert state == "done", page.eval("document.getElementById('status').textContent")
        data_url = page.eval("(async () => { const i = document.getElementById('decoded'); await i.decode(); "
                             "const c = document.createElement('canvas'); c.width = i.naturalWidth; "
                             "c.height = i.naturalHeight; c.getContext('2d').drawImage(i, 0, 0); "
                             "return c.toDataURL('image/png'); })()")
        decoded = from_data_url(data_url)[..., :3]
    from safetensors.numpy import load_file

    model = AutoencoderKL.from_pretrained(klvae.DEFAULT_MODEL)
    z = torch.from_numpy(load_file(str(latent_path))["latents"]).float()
    with torch.inference_mode():
        y = model.decode(unscale_latents(z, model.config)).sample[0].permute(1, 2, 0).numpy()[:60, :90]
    expected = np.round(np.clip((y + 1) / 2, 0, 1) * 255).astype(np.uint8)
    assert decoded.shape == expected.shape and np.abs(decoded.astype(int) - expected).max() <= 1
    # The scrape needs no token; the page's requests were counted.
    metrics = requests.get(f"{url}/metrics", timeout=TIMEOUT).text
    assert re.search(r'klvae_requests_total\{route="/roundtrip",status="200"\} 2\.0', metrics)
    assert re.search(r'klvae_rejected_requests_total\{reason="unauthorized"\} [1-9]', metrics)
