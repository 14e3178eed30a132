"""Liveness and readiness: `/health` answers as soon as the server runs, `/ready` only once the model has been
warmed up (503 before, after a failed warm-up and while stopping); `klvae serve` defaults to the bundled model."""

from __future__ import annotations

import os
import threading
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

from conftest import TINY_CONFIGS, saved_model  # noqa: E402

import klvae  # noqa: E402
from klvae.cli import build_parser  # noqa: E402
from klvae.cli.serve import _model_folder  # noqa: E402
from klvae.serve import Engine, ServerThread, ServeSettings, create_app  # noqa: E402
from klvae.serve.readiness import WARMUP_LATENT_SIDE  # noqa: E402
from klvae.torch.model import AutoencoderKL  # noqa: E402

TIMEOUT = 30


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return AutoencoderKL.from_pretrained(saved_model(tmp_path_factory, TINY_CONFIGS["two_blocks"], seed=7))


class RecordingEngine(Engine):
    """The real engine; records the calls and can hold them at a gate or fail them."""

    def __init__(self, model, gate: threading.Event | None = None, fail: bool = False):
        super().__init__(model)
        self.gate, self.fail, self.calls = gate, fail, []

    def run(self, op, x):
        self.calls.append((op, tuple(x.shape)))
        if self.gate is not None:
            assert self.gate.wait(TIMEOUT)
        if self.fail:
            raise RuntimeError("simulated device failure")
        return super().run(op, x)


def get(url: str, path: str) -> requests.Response:
    return requests.get(f"{url}{path}", timeout=TIMEOUT)


def wait_ready(url: str) -> requests.Response:
    deadline = time.monotonic() + TIMEOUT
    while (r := get(url, "/ready")).status_code != 200:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.02)
    return r


def test_not_ready_until_warmed_up(model):
    gate = threading.Event()
    engine = RecordingEngine(model, gate)
    app = create_app(engine, ServeSettings())
    with ServerThread(app) as server:
        r = get(server.url, "/ready")
        assert r.status_code == 503 and r.json()["status"] == "starting" and r.headers["retry-after"] == "1"
        assert get(server.url, "/health").status_code == 200  # alive while not ready
        assert "klvae_ready 0.0" in get(server.url, "/metrics").text
        gate.set()
        body = wait_ready(server.url).json()
        assert body["status"] == "ready" and body["warmup_s"] > 0
        assert "klvae_ready 1.0" in get(server.url, "/metrics").text
        side = WARMUP_LATENT_SIDE * engine.factor
        latent = WARMUP_LATENT_SIDE
        assert engine.calls == [("encode", (1, 3, side, side)), ("decode", (1, 4, latent, latent))]
    assert app.state.service.readiness.state == "stopping"


def test_a_failed_warm_up_keeps_the_server_live_but_not_ready(model):
    with ServerThread(create_app(RecordingEngine(model, fail=True), ServeSettings())) as server:
        deadline = time.monotonic() + TIMEOUT
        while (r := get(server.url, "/ready")).json()["status"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert r.status_code == 503 and "simulated device failure" in r.json()["detail"]
        assert get(server.url, "/health").status_code == 200


def test_ready_without_warm_up_when_asked(model):
    engine = RecordingEngine(model)
    with ServerThread(create_app(engine, ServeSettings(warmup=False))) as server:
        assert get(server.url, "/ready").status_code == 200
    assert engine.calls == []


def test_serve_defaults_to_the_bundled_model(tmp_path, monkeypatch):
    args = build_parser().parse_args(["serve"])
    assert args.model is None and not args.protect_metrics and args.metrics and args.warmup
    assert _model_folder(None) == (os.fspath(klvae.DEFAULT_MODEL), "default")
    assert _model_folder("default") == (os.fspath(klvae.DEFAULT_MODEL), "default")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()  # a folder of that name wins
    assert _model_folder("default") == ("default", "default")
    assert _model_folder(str(tmp_path)) == (str(tmp_path), str(tmp_path))


def test_protect_metrics_needs_a_token(monkeypatch):
    from klvae.cli.serve import run
    from klvae.serve.errors import ServeError

    monkeypatch.delenv("KLVAE_SERVE_TOKEN", raising=False)
    with pytest.raises(ServeError, match="needs a token"):
        run(build_parser().parse_args(["serve", "--protect-metrics"]))
