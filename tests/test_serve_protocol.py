"""klvae.serve's protocol pieces without a server: query parsing as diffusers' client encodes it, tensor bytes
both ways, packed latents, scaling, images in and out, and the token check."""

from __future__ import annotations

import base64
import io
import json
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("starlette")
PIL_Image = pytest.importorskip("PIL.Image")
requests = pytest.importorskip("requests")
remote_utils = pytest.importorskip("diffusers.utils.remote_utils")

from starlette.datastructures import QueryParams  # noqa: E402
from starlette.requests import Request  # noqa: E402

from klvae.config import preset  # noqa: E402
from klvae.serve import images, protocol  # noqa: E402
from klvae.serve.errors import BadRequest, PayloadTooLarge, Unauthorized  # noqa: E402
from klvae.serve.security import check_token  # noqa: E402


def wire_params(params: dict) -> QueryParams:
    """Query parameters exactly as ``requests`` puts them on the URL, parsed as Starlette parses them."""
    url = requests.Request("POST", "http://127.0.0.1/decode", params=params).prepare().url
    return QueryParams(url.partition("?")[2])


def client_decode_request(tensor, **kwargs):
    """What diffusers' remote_decode sends for ``tensor``: (body bytes, parsed params, Accept header)."""
    sent = remote_utils.prepare_decode(tensor=tensor, **kwargs)
    return sent["data"], wire_params(sent["params"]), sent["headers"]["Accept"]


def client_reads(data: bytes, headers: dict):
    """The tensor diffusers' client reads back from a response (its own postprocess_encode)."""
    return remote_utils.postprocess_encode(types.SimpleNamespace(content=data, headers=headers))


# ---------------------------------------------------------------------------------------------- tensors
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_client_tensor_round_trip(dtype):
    z = torch.randn(2, 4, 5, 3).to(dtype)
    data, params, accept = client_decode_request(z, output_type="pt", scaling_factor=0.5, shift_factor=0.25)
    req = protocol.parse_decode_request(params, accept)
    assert req.tensor.shape == (2, 4, 5, 3) and req.tensor.dtype == dtype
    assert (req.output, req.scaling_factor, req.shift_factor) == ("tensor", 0.5, 0.25)
    x = protocol.tensor_from_bytes(data, req.tensor)
    assert torch.equal(x, z)
    out_data, headers = protocol.tensor_to_bytes(x)
    assert headers == {"shape": json.dumps([2, 4, 5, 3]), "dtype": str(dtype).removeprefix("torch.")}
    back = client_reads(out_data, headers)
    assert back.dtype == dtype and torch.equal(back, z)


def test_uint8_response_reads_back():
    x = torch.randint(0, 256, (2, 7, 5, 3), dtype=torch.uint8)
    back = client_reads(*protocol.tensor_to_bytes(x))
    assert back.dtype == torch.uint8 and torch.equal(back, x)


def test_decode_output_kinds_follow_the_client():
    z = torch.randn(1, 4, 4, 4)
    cases = [(dict(output_type="pt"), "tensor"), (dict(output_type="pt", partial_postprocess=True), "uint8"),
             (dict(output_type="pil", image_format="png"), "image"),
             (dict(output_type="pil", image_format="jpg"), "image"),
             (dict(output_type="pil", processor=object()), "unit_tensor")]
    for kwargs, expected in cases:
        _, params, accept = client_decode_request(z, **kwargs)
        req = protocol.parse_decode_request(params, accept)
        assert req.output == expected, kwargs
    _, params, accept = client_decode_request(z, output_type="pil", image_format="png")
    assert protocol.parse_decode_request(params, accept).image_format == "png"
    # The deprecated do_scaling=True without factors is sent as a flag.
    _, params, accept = client_decode_request(z, output_type="pt")
    req = protocol.parse_decode_request(params, accept)
    assert req.do_scaling and req.scaling_factor is None


def test_shape_as_json_list_is_accepted():
    spec = protocol.parse_tensor_spec(QueryParams("shape=[1,%204,%208,%208]&dtype=float16"))
    assert spec.shape == (1, 4, 8, 8) and spec.nbytes == 1 * 4 * 8 * 8 * 2


@pytest.mark.parametrize("query, fragment", [
    ("shape=1&shape=4", "without 'dtype'"),
    ("dtype=float32", "without 'shape'"),
    ("shape=1&shape=4&dtype=float64", "unknown dtype"),
    ("shape=1&shape=4&dtype=int8", "unknown dtype"),
    ("shape=1&shape=0&dtype=float32", "below 1"),
    ("shape=1&shape=-4&dtype=float32", "below 1"),
    ("shape=1&shape=x&dtype=float32", "not an integer"),
    ("shape=1.5&dtype=float32", "not an integer"),
    ("shape=[1,&dtype=float32", "not a JSON list"),
    ("shape=1&shape=1&shape=1&shape=1&shape=1&shape=1&dtype=float32", "1 to 5 dimensions"),
])
def test_bad_tensor_specs(query, fragment):
    with pytest.raises(BadRequest, match=fragment):
        protocol.parse_tensor_spec(QueryParams(query))


@pytest.mark.parametrize("query, fragment", [
    ("output_type=mp4", "video models"),
    ("output_type=latent", "not supported"),
    ("image_format=gif&output_type=pil", "not supported"),
    ("partial_postprocess=maybe", "not a boolean"),
    ("scaling_factor=abc", "not a number"),
    ("scaling_factor=0", "non-zero"),
    ("shift_factor=nan", "finite"),
    ("scaling_factor=inf", "finite"),
    ("height=64", "go together"),
    ("height=-1&width=8", "below 1"),
])
def test_bad_decode_parameters(query, fragment):
    with pytest.raises(BadRequest, match=fragment):
        protocol.parse_decode_request(QueryParams("shape=1&shape=4&shape=2&shape=2&dtype=float32&" + query))


def test_decode_needs_a_tensor_spec():
    with pytest.raises(BadRequest, match="'shape'"):
        protocol.parse_decode_request(QueryParams("output_type=pt"))


def test_huge_dimension_is_too_large():
    with pytest.raises(PayloadTooLarge):
        protocol.parse_tensor_spec(QueryParams(f"shape={2**24 + 1}&dtype=float32"))


def test_tensor_bytes_are_checked():
    spec = protocol.TensorSpec((1, 4, 2, 2), "float32")
    with pytest.raises(BadRequest, match="empty body"):
        protocol.tensor_from_bytes(b"", spec)
    with pytest.raises(BadRequest, match="needs 64"):
        protocol.tensor_from_bytes(b"\0" * 63, spec)
    with pytest.raises(BadRequest, match="NaN"):
        protocol.tensor_from_bytes(torch.full((1, 4, 2, 2), float("nan")).numpy().tobytes(), spec)
    assert protocol.tensor_from_bytes(np.arange(16, dtype=np.float32).tobytes(), spec).flatten().tolist() == \
        list(range(16))


# ---------------------------------------------------------------------------------------------- packing, scaling
def test_unpack_matches_flux_pipeline():
    flux = pytest.importorskip("diffusers.pipelines.flux.pipeline_flux").FluxPipeline
    for factor, (height, width) in [(8, (48, 80)), (2, (12, 20)), (8, (50, 82))]:
        h, w = 2 * (height // (2 * factor)), 2 * (width // (2 * factor))
        z = torch.randn(2, 16, h, w)
        packed = flux._pack_latents(z, 2, 16, h, w)
        ours = protocol.unpack_latents(packed, height, width, factor, 16)
        assert torch.equal(ours, flux._unpack_latents(packed, height, width, factor))
        assert torch.equal(ours, z)
    with pytest.raises(BadRequest, match="do not fit"):
        protocol.unpack_latents(torch.randn(1, 10, 64), 48, 80, 8, 16)


def test_scaling_follows_the_client_docs():
    z = torch.randn(1, 4, 3, 3)
    sd3 = preset("sd3")
    req = protocol.DecodeRequest(protocol.TensorSpec((1, 4, 3, 3), "float32"), "tensor", "jpg", 0.5, 0.1, False,
                                 None, None)
    torch.testing.assert_close(protocol.unscale_for_decode(z, req, sd3), z / 0.5 + 0.1)
    only_shift = protocol.DecodeRequest(req.tensor, "tensor", "jpg", None, 0.1, True, None, None)
    torch.testing.assert_close(protocol.unscale_for_decode(z, only_shift, sd3), z + 0.1)
    config_default = protocol.DecodeRequest(req.tensor, "tensor", "jpg", None, None, True, None, None)
    torch.testing.assert_close(protocol.unscale_for_decode(z, config_default, sd3),
                               z / sd3.scaling_factor + sd3.shift_factor)
    unscaled = protocol.DecodeRequest(req.tensor, "tensor", "jpg", None, None, False, None, None)
    assert protocol.unscale_for_decode(z, unscaled, sd3) is z
    enc = protocol.EncodeRequest(None, 0.5, 0.1)
    torch.testing.assert_close(protocol.scale_after_encode(z, enc), (z - 0.1) * 0.5)


# ---------------------------------------------------------------------------------------------- images
def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL_Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_image_input_matches_diffusers_preprocess():
    from diffusers.image_processor import VaeImageProcessor

    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    ours = images.image_to_tensor(png_bytes(rgb), 3, max_pixels=10_000)
    ref = VaeImageProcessor(do_resize=False).preprocess(PIL_Image.fromarray(rgb))
    assert ours.shape == (1, 3, 12, 10) and torch.equal(ours, ref)
    rgba = np.concatenate([rgb, np.full((12, 10, 1), 7, np.uint8)], axis=2)
    assert torch.equal(images.image_to_tensor(png_bytes(rgba), 3, 10_000), ours)  # alpha dropped
    gray = images.image_to_tensor(png_bytes(rgb), 1, 10_000)
    assert gray.shape == (1, 1, 12, 10)


def test_bad_images_are_refused():
    rgb = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(BadRequest, match="empty body"):
        images.image_to_tensor(b"", 3, 10_000)
    with pytest.raises(BadRequest, match="not a readable PNG or JPEG"):
        images.image_to_tensor(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, 3, 10_000)
    with pytest.raises(BadRequest, match="not a readable PNG or JPEG"):
        noisy = np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8)
        images.image_to_tensor(png_bytes(noisy)[:400], 3, 10_000)  # truncated
    gif = io.BytesIO()
    PIL_Image.fromarray(rgb).save(gif, format="GIF")
    with pytest.raises(BadRequest, match="not a readable PNG or JPEG"):
        images.image_to_tensor(gif.getvalue(), 3, 10_000)
    with pytest.raises(PayloadTooLarge, match="20x20"):
        images.image_to_tensor(png_bytes(rgb), 3, 399)
    buf = io.BytesIO()
    PIL_Image.new("I;16", (4, 4)).save(buf, format="PNG")
    sixteen = buf.getvalue()
    with pytest.raises(BadRequest, match="mode"):
        images.image_to_tensor(sixteen, 3, 10_000)


def test_image_output_matches_diffusers_postprocess():
    from diffusers.image_processor import VaeImageProcessor

    x = torch.randn(2, 3, 6, 5) * 0.7
    ours = images.to_uint8_hwc(x)
    ref = np.stack([np.asarray(im) for im in VaeImageProcessor().postprocess(x, output_type="pil")])
    assert ours.dtype == torch.uint8 and np.array_equal(ours.numpy(), ref)
    png = images.encode_image(ours[0], "png")
    assert png.startswith(b"\x89PNG") and np.array_equal(np.asarray(PIL_Image.open(io.BytesIO(png))), ref[0])
    jpg = images.encode_image(ours[0], "jpg")
    assert jpg.startswith(b"\xff\xd8")
    gray = images.encode_image(images.to_uint8_hwc(x[:, :1])[0], "png")
    assert PIL_Image.open(io.BytesIO(gray)).mode == "L"
    with pytest.raises(BadRequest, match="1, 3 or 4"):
        images.encode_image(images.to_uint8_hwc(x[:, :2])[0], "png")


# ---------------------------------------------------------------------------------------------- token
def request_with(authorization: str | None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode("latin-1"))]
    return Request({"type": "http", "method": "POST", "path": "/decode", "headers": headers})


def test_token_check():
    check_token(request_with(None), None)  # no token configured: open
    check_token(request_with("Bearer s3cret"), "s3cret")
    check_token(request_with("bearer  s3cret "), "s3cret")
    basic = base64.b64encode(b"anyone:s3cret").decode()
    check_token(request_with(f"Basic {basic}"), "s3cret")
    for bad in (None, "Bearer wrong", "Bearer", "Token s3cret", "s3cret", "Basic !!!",
                "Basic " + base64.b64encode(b"s3cret:").decode()):
        with pytest.raises(Unauthorized):
            check_token(request_with(bad), "s3cret")
