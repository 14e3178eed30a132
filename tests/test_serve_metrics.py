"""`GET /metrics`: the Prometheus instruments move as requests arrive, with the right labels and buckets; the
token guards them only with protect_metrics. Read back with prometheus_client's own text parser, over real HTTP."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
requests = pytest.importorskip("requests")

from conftest import TINY_CONFIGS, saved_model  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from klvae.serve import Engine, ServerThread, ServeSettings, create_app  # noqa: E402
from klvae.serve.metrics import BATCH_BUCKETS, OTHER_ROUTE, Metrics  # noqa: E402
from klvae.torch.model import AutoencoderKL  # noqa: E402

TIMEOUT = 30
TOKEN = "metrics-token"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_model(tmp_path_factory, TINY_CONFIGS["two_blocks"], seed=5)


def scrape(url: str, **kw) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from the text exposition."""
    r = requests.get(f"{url}/metrics", timeout=TIMEOUT, **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def decode(url: str, batch: int, **kw) -> requests.Response:
    z = np.random.default_rng(batch).standard_normal((batch, 4, 3, 3)).astype(np.float32)
    params = {"shape": [batch, 4, 3, 3], "dtype": "float32", "output_type": "pt"}
    return requests.post(f"{url}/decode", params=params, data=z.tobytes(), timeout=TIMEOUT, **kw)


def test_counters_histograms_and_labels(model_dir):
    with ServerThread(create_app(Engine.from_folder(model_dir), ServeSettings(max_batch=8))) as server:
        url = server.url
        before = scrape(url)
        assert decode(url, 3).status_code == 200
        assert decode(url, 1).status_code == 200
        assert requests.post(f"{url}/decode", params={"shape": [1, 4, 3, 3], "dtype": "float32"}, data=b"x" * 7,
                             timeout=TIMEOUT).status_code == 400
        assert requests.get(f"{url}/no/such/page", timeout=TIMEOUT).status_code == 404
        assert requests.get(f"{url}/decode", timeout=TIMEOUT).status_code == 405
        for _ in range(3):
            assert requests.get(f"{url}/health", timeout=TIMEOUT).status_code == 200
        after = scrape(url)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("klvae_requests_total", route="/decode", status="200") == 2
    assert delta("klvae_requests_total", route="/decode", status="400") == 1
    assert delta("klvae_requests_total", route="/decode", status="405") == 1
    assert delta("klvae_requests_total", route=OTHER_ROUTE, status="404") == 1  # unknown paths share one label
    assert delta("klvae_requests_total", route="/health", status="200") == 3
    assert value(after, "klvae_requests_total", route="/metrics", status="200") >= 1  # the first scrape
    assert not any("no/such" in str(k) for k in after)
    # Rejections by reason.
    assert delta("klvae_rejected_requests_total", reason="bad_request") == 1
    assert delta("klvae_rejected_requests_total", reason="not_found") == 1
    assert delta("klvae_rejected_requests_total", reason="method_not_allowed") == 1
    # Latency histogram: one observation per request, cumulative buckets ending at the count.
    assert delta("klvae_request_duration_seconds_count", route="/decode") == 4
    assert delta("klvae_request_duration_seconds_count", route="/health") == 3
    buckets = sorted((float(dict(k)["le"]), v) for (n, k), v in after.items()
                     if n == "klvae_request_duration_seconds_bucket" and dict(k)["route"] == "/decode")
    assert buckets[-1] == (float("inf"), value(after, "klvae_request_duration_seconds_count", route="/decode"))
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
    assert delta("klvae_request_duration_seconds_sum", route="/decode") > 0
    # Batch sizes (no warm-up batch is counted: it runs outside the batcher): one batch of 3, one of 1.
    assert delta("klvae_batch_size_count", op="decode") == 2
    assert delta("klvae_batch_size_sum", op="decode") == 4
    assert delta("klvae_batch_size_bucket", op="decode", le="1.0") == 1
    assert delta("klvae_batch_size_bucket", op="decode", le="2.0") == 1
    assert delta("klvae_batch_size_bucket", op="decode", le="4.0") == 2
    assert {float(dict(k)["le"]) for (n, k) in after if n == "klvae_batch_size_bucket"} == \
        {*map(float, BATCH_BUCKETS), float("inf")}
    assert delta("klvae_model_compute_seconds_count", op="decode") == 2
    assert delta("klvae_model_compute_seconds_sum", op="decode") > 0
    assert value(after, "klvae_ready") == 1
    assert value(after, "klvae_queue_depth") == 0
    assert value(after, "klvae_requests_in_flight") == 0  # the scrape itself is not counted
    info = [dict(k) for (n, k) in after if n == "klvae_model_info"]
    assert info and info[0]["name"] == "vae" and info[0]["class"] == "AutoencoderKL" and info[0]["dtype"] == "float32"
    assert value(after, "process_resident_memory_bytes") > 0


class GatedEngine(Engine):
    """The real engine, held at the start of each batch until the test opens the gate."""

    def __init__(self, model, gate: threading.Event):
        super().__init__(model)
        self.gate, self.entered = gate, threading.Event()

    def run(self, op, x):
        self.entered.set()
        assert self.gate.wait(TIMEOUT)
        return super().run(op, x)


def test_queue_depth_in_flight_and_queue_full_rejections(model_dir):
    gate = threading.Event()
    engine = GatedEngine(AutoencoderKL.from_pretrained(model_dir), gate)
    settings = ServeSettings(max_batch=1, max_queue=1, batch_wait_ms=0, warmup=False)
    codes: list[int] = []
    with ServerThread(create_app(engine, settings)) as server:
        url = server.url
        first = threading.Thread(target=lambda: codes.append(decode(url, 1).status_code))
        first.start()
        assert engine.entered.wait(TIMEOUT)  # the first request holds the model
        second = threading.Thread(target=lambda: codes.append(decode(url, 1).status_code))
        second.start()
        deadline = time.monotonic() + TIMEOUT
        while value(samples := scrape(url), "klvae_queue_depth") != 1:  # the second one waits in the queue
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert value(samples, "klvae_requests_in_flight") == 2
        third = decode(url, 1)
        assert third.status_code == 503 and third.json()["code"] == "unavailable"
        full = scrape(url)
        assert value(full, "klvae_rejected_requests_total", reason="queue_full") == 1
        assert value(full, "klvae_requests_total", route="/decode", status="503") == 1
        gate.set()
        first.join(TIMEOUT)
        second.join(TIMEOUT)
        done = scrape(url)
    assert codes == [200, 200]
    assert value(done, "klvae_queue_depth") == 0 and value(done, "klvae_requests_in_flight") == 0
    assert value(done, "klvae_requests_total", route="/decode", status="200") == 2


def test_token_guards_metrics_and_health_only_when_asked(model_dir):
    engine = Engine.from_folder(model_dir)
    with ServerThread(create_app(engine, ServeSettings(token=TOKEN))) as server:
        scrape(server.url)  # open to scrapers by default
        assert requests.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200
        assert requests.get(f"{server.url}/info", timeout=TIMEOUT).status_code == 401
        assert value(scrape(server.url), "klvae_rejected_requests_total", reason="unauthorized") == 1
    with ServerThread(create_app(engine, ServeSettings(token=TOKEN, protect_metrics=True))) as server:
        for path in ("/metrics", "/health", "/ready"):
            assert requests.get(f"{server.url}{path}", timeout=TIMEOUT).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert value(scrape(server.url, headers=auth), "klvae_rejected_requests_total", reason="unauthorized") == 3
        assert requests.get(f"{server.url}/health", headers=auth, timeout=TIMEOUT).status_code == 200


def test_metrics_can_be_turned_off(model_dir):
    with ServerThread(create_app(Engine.from_folder(model_dir), ServeSettings(metrics=False))) as server:
        assert requests.get(f"{server.url}/metrics", timeout=TIMEOUT).status_code == 404
        assert decode(server.url, 1).status_code == 200


def test_route_labels_are_bounded():
    m = Metrics(["/decode", "/"], process=False)
    assert m.route("/decode") == "/decode" and m.route("/") == "/"
    assert m.route("/decode/") == OTHER_ROUTE and m.route("/../etc/passwd") == OTHER_ROUTE
    m.observe_batch("encode", 5, 0.25)
    m.reject("too_large")
    text = m.render().decode()
    assert 'klvae_batch_size_bucket{le="4.0",op="encode"} 0.0' in text
    assert 'klvae_batch_size_bucket{le="8.0",op="encode"} 1.0' in text
    assert 'klvae_model_compute_seconds_sum{op="encode"} 0.25' in text
    assert 'klvae_rejected_requests_total{reason="too_large"} 1.0' in text
    assert "process_" not in text
