"""`klvae serve` against diffusers' own remote client (remote_decode / remote_encode) on loopback, compared with
the same model run locally; plus errors, limits and the token, over real HTTP to a real uvicorn."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
PIL_Image = pytest.importorskip("PIL.Image")
requests = pytest.importorskip("requests")
remote_utils = pytest.importorskip("diffusers.utils.remote_utils")

from conftest import TINY_CONFIGS, rel_err, saved_model  # noqa: E402
from diffusers.image_processor import VaeImageProcessor  # noqa: E402

from klvae.serve import Engine, ServerThread, ServeSettings, create_app, images  # noqa: E402
from klvae.torch.model import AutoencoderKL  # noqa: E402

remote_decode, remote_encode = remote_utils.remote_decode, remote_utils.remote_encode
TINY = TINY_CONFIGS["two_blocks"]
TOKEN = "t0ken-for-tests"
TIMEOUT = 30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_model(tmp_path_factory, dict(TINY, scaling_factor=0.3, shift_factor=0.05), seed=3)


@pytest.fixture(scope="module")
def local(model_dir):
    return AutoencoderKL.from_pretrained(model_dir)


def start(model_dir, **settings) -> ServerThread:
    return ServerThread(create_app(Engine.from_folder(model_dir), ServeSettings(**settings))).start()


@pytest.fixture(scope="module")
def server(model_dir):
    s = start(model_dir)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small_server(model_dir):
    s = start(model_dir, max_pixels=32 * 32)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def token_server(model_dir):
    s = start(model_dir, token=TOKEN)
    yield s
    s.stop()


def decode_local(model, z):
    with torch.inference_mode():
        return model.decode(z).sample


def uint8_local(model, z):
    return (decode_local(model, z) / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)


def assert_uint8_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """uint8 images equal up to a rounding flip (batched and single runs differ by float rounding)."""
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert actual.shape == expected.shape and diff.max() <= 1 and (diff > 0).mean() < 0.01


# ---------------------------------------------------------------------------------------------- decode
def test_decode_pt(server, local):
    z = torch.randn(2, 4, 9, 7, generator=torch.Generator().manual_seed(0))
    out = remote_decode(f"{server.url}/decode", z, output_type="pt", return_type="pt", scaling_factor=0.3,
                        shift_factor=0.05)
    ref = decode_local(local, z / 0.3 + 0.05)
    assert out.shape == (2, 3, 18, 14) and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    # With a processor the client turns the same tensor into images itself.
    pils = remote_decode(f"{server.url}/decode", z, processor=VaeImageProcessor(), output_type="pt",
                         return_type="pil", scaling_factor=0.3, shift_factor=0.05)
    assert_uint8_close(np.asarray(pils), uint8_local(local, z / 0.3 + 0.05)[:1].numpy()[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_pt_half_inputs_come_back_in_their_dtype(server, local, dtype):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = remote_decode(f"{server.url}/decode", z, output_type="pt", return_type="pt", scaling_factor=0.3)
    assert out.dtype == dtype
    ref = decode_local(local, z.float() / 0.3)
    assert rel_err(out, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_decode_pt_partial_postprocess(server, local):
    z = torch.randn(3, 4, 6, 10, generator=torch.Generator().manual_seed(2))
    out = remote_decode(f"{server.url}/decode", z, output_type="pt", partial_postprocess=True, return_type="pt",
                        scaling_factor=0.3)
    assert out.dtype == torch.uint8 and out.shape == (3, 12, 20, 3)  # batch, height, width, channels
    assert_uint8_close(out.numpy(), uint8_local(local, z / 0.3).numpy())
    pils = remote_decode(f"{server.url}/decode", z, output_type="pt", partial_postprocess=True, return_type="pil",
                         scaling_factor=0.3)
    assert len(pils) == 3 and pils[0].size == (20, 12)
    assert_uint8_close(np.asarray(pils[2]), out[2].numpy())


def test_decode_png(server, local):
    z = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(3))
    image = remote_decode(f"{server.url}/decode", z, output_type="pil", image_format="png", scaling_factor=0.3,
                          shift_factor=0.05)
    assert image.format == "png" and image.mode == "RGB" and image.size == (12, 16)
    assert_uint8_close(np.asarray(image), uint8_local(local, z / 0.3 + 0.05)[0].numpy())


def test_decode_jpg(server, local):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4)) * 0.5
    image = remote_decode(f"{server.url}/decode", z, output_type="pil", image_format="jpg", scaling_factor=0.3)
    assert image.format == "jpeg" and image.size == (32, 32)
    ref = uint8_local(local, z / 0.3)[0]
    # The same pixels JPEG-encoded here decode to (nearly) the same image: JPEG is deterministic.
    same = np.asarray(PIL_Image.open(io.BytesIO(images.encode_image(ref, "jpg"))), dtype=np.float64)
    got = np.asarray(image, dtype=np.float64)
    assert np.abs(got - same).mean() < 0.1
    mse = np.mean((got - ref.numpy()) ** 2)
    assert 10 * np.log10(255**2 / max(mse, 1e-12)) > 30  # PSNR of a quality-95 4:4:4 JPEG


def test_decode_pil_with_processor_gets_unit_tensor(server, local):
    z = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(5))
    out = remote_decode(f"{server.url}/decode", z, processor=VaeImageProcessor(), output_type="pil",
                        return_type="pt", scaling_factor=0.3)
    ref = (decode_local(local, z / 0.3) / 2 + 0.5).clamp(0, 1)
    assert out.shape == (2, 3, 10, 10) and rel_err(out, ref) < 1e-5


def test_decode_deprecated_do_scaling_uses_model_config(server, local):
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = remote_decode(f"{server.url}/decode", z, output_type="pt", return_type="pt")  # do_scaling=True
        raw = remote_decode(f"{server.url}/decode", z, output_type="pt", return_type="pt", do_scaling=False)
    assert rel_err(out, decode_local(local, z / 0.3 + 0.05)) < 1e-5
    assert rel_err(raw, decode_local(local, z)) < 1e-5


def test_decode_packed_latents(server, local):
    flux = pytest.importorskip("diffusers.pipelines.flux.pipeline_flux").FluxPipeline
    z = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(7))
    packed = flux._pack_latents(z, 2, 4, 6, 8)  # (2, 12, 16); the image is 12 x 16 (factor 2)
    out = remote_decode(f"{server.url}/decode", packed, output_type="pt", return_type="pt", scaling_factor=0.3,
                        height=12, width=16)
    assert rel_err(out, decode_local(local, z / 0.3)) < 1e-5


# ---------------------------------------------------------------------------------------------- encode
def encode_local(model, x):
    with torch.inference_mode():
        return model.encode(x).latent_dist.mode()


def test_encode_pil(server, local):
    rgb = np.random.default_rng(0).integers(0, 256, (16, 12, 3), dtype=np.uint8)
    image = PIL_Image.fromarray(rgb)
    out = remote_encode(f"{server.url}/encode", image, scaling_factor=0.3, shift_factor=0.05)
    x = VaeImageProcessor(do_resize=False).preprocess(image)
    ref = (encode_local(local, x) - 0.05) * 0.3
    assert out.shape == (1, 4, 8, 6) and out.dtype == torch.float32 and rel_err(out, ref) < 1e-5
    raw = remote_encode(f"{server.url}/encode", image)
    assert rel_err(raw, encode_local(local, x)) < 1e-5


def test_encode_tensor(server, local):
    x = torch.rand(2, 3, 10, 14, generator=torch.Generator().manual_seed(8)) * 2 - 1
    out = remote_encode(f"{server.url}/encode", x, scaling_factor=0.3)
    assert out.shape == (2, 4, 5, 7) and rel_err(out, encode_local(local, x) * 0.3) < 1e-5
    half = remote_encode(f"{server.url}/encode", x.half(), scaling_factor=0.3)
    assert half.dtype == torch.float16 and rel_err(half, encode_local(local, x.half().float()) * 0.3) < 2e-3


def test_encode_decode_round_trip_through_the_client(server, local):
    image = PIL_Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    latents = remote_encode(f"{server.url}/encode", image, scaling_factor=0.3)
    back = remote_decode(f"{server.url}/decode", latents, output_type="pil", image_format="png", scaling_factor=0.3)
    expected = uint8_local(local, encode_local(local, VaeImageProcessor().preprocess(image)))[0].numpy()
    assert_uint8_close(np.asarray(back), expected)


# ---------------------------------------------------------------------------------------------- health, info
def test_health_and_info(server):
    assert requests.get(f"{server.url}/health", timeout=TIMEOUT).json() == {"status": "ok"}
    info = requests.get(f"{server.url}/info", timeout=TIMEOUT).json()
    assert info["model"]["config"]["latent_channels"] == 4 and info["model"]["downsample_factor"] == 2
    assert info["model"]["dtype"] == "float32" and info["limits"]["max_pixels"] == ServeSettings().max_pixels
    assert info["batching"]["max_batch"] == 8


# ---------------------------------------------------------------------------------------------- errors
def post(url, *, params=None, data=b"", headers=None):
    return requests.post(url, params=params, data=data, headers=headers, timeout=TIMEOUT)


def latents_bytes(shape, dtype=np.float32):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype).tobytes()


SHAPE = [1, 4, 4, 4]
MALFORMED = [
    ("decode", dict(shape=SHAPE, dtype="float32"), latents_bytes(SHAPE)[:-4], 400, "need exactly 256 bytes"),
    ("decode", dict(shape=SHAPE, dtype="float32"), latents_bytes(SHAPE) + b"x", 400, "need exactly 256 bytes"),
    ("decode", dict(shape=SHAPE, dtype="float32"), b"", 400, "empty body"),
    ("decode", dict(shape=SHAPE, dtype="complex64"), latents_bytes(SHAPE), 400, "unknown dtype"),
    ("decode", dict(shape=SHAPE), latents_bytes(SHAPE), 400, "without 'dtype'"),
    ("decode", dict(dtype="float32"), latents_bytes(SHAPE), 400, "without 'shape'"),
    ("decode", {}, latents_bytes(SHAPE), 400, "'shape'"),
    ("decode", dict(shape=[1, 3, 4, 4], dtype="float32"), latents_bytes([1, 3, 4, 4]), 400, "4 latent channels"),
    ("decode", dict(shape=[4, 4], dtype="float32"), latents_bytes([4, 4]), 400, "latents must be"),
    ("decode", dict(shape=[1, 4, 4], dtype="float32"), latents_bytes([1, 4, 4]), 400, "'height' and 'width'"),
    ("decode", dict(shape=[1, 4, 16], dtype="float32", height=64, width=64), latents_bytes([1, 4, 16]), 400,
     "do not fit"),
    ("decode", dict(shape=SHAPE, dtype="float32", output_type="mp4"), latents_bytes(SHAPE), 400, "video"),
    ("decode", dict(shape=SHAPE, dtype="float32", output_type="np"), latents_bytes(SHAPE), 400, "output_type"),
    ("decode", dict(shape=SHAPE, dtype="float32", image_format="bmp"), latents_bytes(SHAPE), 400, "image_format"),
    ("decode", dict(shape=SHAPE, dtype="float32", scaling_factor="x"), latents_bytes(SHAPE), 400, "not a number"),
    ("decode", dict(shape=SHAPE, dtype="float32", scaling_factor=0), latents_bytes(SHAPE), 400, "non-zero"),
    ("decode", dict(shape=SHAPE, dtype="float32", partial_postprocess="perhaps"), latents_bytes(SHAPE), 400,
     "boolean"),
    ("decode", dict(shape=[2, 4, 4, 4], dtype="float32", output_type="pil"), latents_bytes([2, 4, 4, 4]), 400,
     "one image"),
    ("decode", dict(shape=SHAPE, dtype="float32"), np.full(SHAPE, np.nan, np.float32).tobytes(), 400, "NaN"),
    ("encode", {}, b"", 400, "empty body"),
    ("encode", {}, b"\x89PNG\r\n\x1a\n" + b"\0" * 100, 400, "not a readable PNG or JPEG"),
    ("encode", {}, b"GIF89a" + b"\0" * 100, 400, "not a readable PNG or JPEG"),
    ("encode", {}, b"import os; os.system('true')", 400, "not a readable PNG or JPEG"),
    ("encode", dict(shape=[1, 3, 4, 4], dtype="float32"), latents_bytes([1, 3, 4, 3]), 400, "need exactly"),
    ("encode", dict(shape=[1, 3, 5, 4], dtype="float32"), latents_bytes([1, 3, 5, 4]), 400, "multiples of 2"),
    ("encode", dict(shape=[1, 4, 4, 4], dtype="float32"), latents_bytes([1, 4, 4, 4]), 400, "images must be"),
]


@pytest.mark.parametrize("route, params, body, status, fragment", MALFORMED,
                         ids=[f"{m[0]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_requests_get_json_4xx(server, route, params, body, status, fragment):
    r = post(f"{server.url}/{route}", params=params, data=body)
    assert r.status_code == status, r.text
    payload = r.json()
    assert payload["status"] == status and fragment in payload["error"], payload
    ok = post(f"{server.url}/decode", params=dict(shape=SHAPE, dtype="float32", output_type="pt"),
              data=latents_bytes(SHAPE))
    assert ok.status_code == 200 and len(ok.content) == 3 * 8 * 8 * 4


def test_odd_sized_png_is_refused(server):
    buf = io.BytesIO()
    PIL_Image.new("RGB", (7, 8)).save(buf, format="PNG")
    r = post(f"{server.url}/encode", data=buf.getvalue())
    assert r.status_code == 400 and "multiples of 2" in r.json()["error"]


def test_unknown_routes_and_methods_are_json(server):
    r = requests.get(f"{server.url}/decode", timeout=TIMEOUT)
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"
    r = requests.get(f"{server.url}/../../etc/passwd", timeout=TIMEOUT)
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_the_client_raises_with_the_servers_message(server):
    z = torch.randn(2, 4, 4, 4)
    with pytest.raises(RuntimeError, match="one image"):
        remote_decode(f"{server.url}/decode", z, output_type="pil", scaling_factor=0.3)


# ---------------------------------------------------------------------------------------------- limits
def test_pixel_limit_on_decode(small_server):
    ok = remote_decode(f"{small_server.url}/decode", torch.randn(1, 4, 16, 16), output_type="pt", return_type="pt",
                       scaling_factor=1.0)
    assert ok.shape == (1, 3, 32, 32)
    r = post(f"{small_server.url}/decode", params=dict(shape=[2, 4, 16, 16], dtype="float32", output_type="pt"),
             data=latents_bytes([2, 4, 16, 16]))
    assert r.status_code == 413 and "2048 pixels" in r.json()["error"]
    r = post(f"{small_server.url}/decode",
             params=dict(shape=[1, 4 * 4, 4], dtype="float32", output_type="pt", height=2**20, width=2**20),
             data=latents_bytes([1, 16, 4]))
    assert r.status_code in (400, 413)


def test_pixel_and_body_limits_on_encode(small_server):
    buf = io.BytesIO()
    PIL_Image.new("RGB", (64, 32)).save(buf, format="PNG")
    r = post(f"{small_server.url}/encode", data=buf.getvalue())
    assert r.status_code == 413 and "64x32" in r.json()["error"]
    r = post(f"{small_server.url}/encode", params=dict(shape=[1, 3, 64, 32], dtype="float32"),
             data=latents_bytes([1, 3, 64, 32]))
    assert r.status_code == 413
    too_big = b"\x89PNG" + b"\0" * (32 * 32 * 3 * 4 + (1 << 16))
    r = post(f"{small_server.url}/encode", data=too_big)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert requests.get(f"{small_server.url}/health", timeout=TIMEOUT).status_code == 200


# ---------------------------------------------------------------------------------------------- token
def test_token_required(token_server, local):
    url = token_server.url
    params = dict(shape=SHAPE, dtype="float32", output_type="pt")
    r = post(f"{url}/decode", params=params, data=latents_bytes(SHAPE))
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = post(f"{url}/decode", params=params, data=latents_bytes(SHAPE), headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert requests.get(f"{url}/info", timeout=TIMEOUT).status_code == 401
    assert requests.get(f"{url}/health", timeout=TIMEOUT).status_code == 200  # liveness stays open
    r = post(f"{url}/decode", params=params, data=latents_bytes(SHAPE), headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    with pytest.raises(RuntimeError, match="token"):
        remote_decode(f"{url}/decode", torch.randn(1, 4, 4, 4), output_type="pt", return_type="pt",
                      scaling_factor=1.0)
    # diffusers' client takes no headers: the token goes in the endpoint URL, sent as HTTP Basic auth.
    authed = url.replace("http://", f"http://klvae:{TOKEN}@")
    z = torch.randn(1, 4, 4, 4)
    out = remote_decode(f"{authed}/decode", z, output_type="pt", return_type="pt", scaling_factor=1.0)
    assert rel_err(out, decode_local(local, z)) < 1e-5
    latents = remote_encode(f"{authed}/encode", PIL_Image.new("RGB", (8, 8)))
    assert latents.shape == (1, 4, 4, 4)
