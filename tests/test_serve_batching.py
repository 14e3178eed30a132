"""Micro-batching, load with malformed requests mixed in, graceful shutdown, and the `klvae serve` command."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
PIL_Image = pytest.importorskip("PIL.Image")
requests = pytest.importorskip("requests")
remote_utils = pytest.importorskip("diffusers.utils.remote_utils")

from conftest import TINY_CONFIGS, rel_err, saved_model, wait_for_server  # noqa: E402

from klvae.serve import Engine, MicroBatcher, ServerThread, ServeSettings, create_app  # noqa: E402
from klvae.serve.errors import Unavailable  # noqa: E402
from klvae.torch.model import AutoencoderKL  # noqa: E402

TINY = TINY_CONFIGS["two_blocks"]
TIMEOUT = 60


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_model(tmp_path_factory, TINY, seed=5)


@pytest.fixture(scope="module")
def local(model_dir):
    return AutoencoderKL.from_pretrained(model_dir)


# ---------------------------------------------------------------------------------------------- the batcher
class Recorder:
    """A fake model: doubles its input after ``delay_s``, recording each batch's key and size."""

    def __init__(self, delay_s: float = 0.05, fail_keys: tuple = ()):
        self.delay_s, self.fail_keys, self.batches = delay_s, fail_keys, []

    def __call__(self, key, x):
        time.sleep(self.delay_s)
        self.batches.append((key, x.shape[0]))
        assert tuple(x.shape[1:]) == key[1:], "a batch mixed shapes"
        if key in self.fail_keys:
            raise RuntimeError("model exploded")
        return x * 2


def run_async(coro_fn, *args, **kwargs):
    return asyncio.run(coro_fn(*args, **kwargs))


def item(key, n=1, value=1.0):
    return torch.full((n, *key[1:]), value)


def test_concurrent_same_shape_requests_share_one_batch():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, max_batch=8, max_wait_s=0.05)
        await b.start()
        key = ("decode", 4, 2, 2)
        outs = await asyncio.gather(*(b.submit(key, item(key, value=i)) for i in range(6)))
        await b.stop()
        return b, outs

    b, outs = run_async(main)
    assert rec.batches == [(("decode", 4, 2, 2), 6)]
    for i, out in enumerate(outs):
        assert out.shape == (1, 4, 2, 2) and torch.all(out == 2 * i)
    assert b.stats.to_dict()["mean_batch"] == 6 and b.stats.requests == 6


def test_keys_are_never_mixed_and_batches_are_capped():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, max_batch=4, max_wait_s=0.05)
        await b.start()
        a, c = ("decode", 4, 2, 2), ("encode", 3, 4, 4)
        jobs = [b.submit(a, item(a, value=i)) for i in range(10)] + [b.submit(c, item(c, 2, value=i)) for i in range(3)]
        outs = await asyncio.gather(*jobs)
        await b.stop()
        return outs

    outs = run_async(main)
    sizes = {key: [n for k, n in rec.batches if k == key] for key, _ in rec.batches}
    assert sizes[("decode", 4, 2, 2)] == [4, 4, 2]
    assert sizes[("encode", 3, 4, 4)] == [4, 2]  # items of 2: two requests fit in 4, the third waits
    assert [float(o.flatten()[0]) for o in outs] == [2.0 * i for i in range(10)] + [2.0 * i for i in range(3)]
    assert all(o.shape[0] == (1 if i < 10 else 2) for i, o in enumerate(outs))


def test_the_window_grows_with_slow_batches():
    rec = Recorder(delay_s=0.5)

    async def main():
        b = MicroBatcher(rec, max_batch=8, max_wait_s=0.001)
        await b.start()
        key = ("decode", 4, 1, 1)
        await b.submit(key, item(key))  # a lone request: no window
        lone = b.wait_s
        await asyncio.gather(b.submit(key, item(key)), b.submit(key, item(key)))  # requests arrive together
        window = b.wait_s  # a tenth of the slow batches
        first = asyncio.ensure_future(b.submit(key, item(key)))
        await asyncio.sleep(0.01)  # longer than max_wait_s, well inside the grown window
        await asyncio.gather(first, b.submit(key, item(key)))
        await b.stop()
        return lone, window

    lone, window = run_async(main)
    assert lone == 0 and window >= 0.05 and [n for _, n in rec.batches] == [1, 2, 2]


def test_a_request_larger_than_max_batch_runs_alone():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, max_batch=4, max_wait_s=0.01)
        await b.start()
        key = ("decode", 4, 1, 1)
        out = await b.submit(key, item(key, 7, value=3.0))
        await b.stop()
        return out

    out = run_async(main)
    assert rec.batches == [(("decode", 4, 1, 1), 7)] and torch.all(out == 6.0) and out.shape[0] == 7


def test_a_failing_batch_fails_its_requests_only():
    bad, good = ("decode", 4, 1, 1), ("decode", 4, 2, 2)
    rec = Recorder(fail_keys=(bad,))

    async def main():
        b = MicroBatcher(rec, max_batch=8, max_wait_s=0.02)
        await b.start()
        results = await asyncio.gather(b.submit(bad, item(bad)), b.submit(bad, item(bad)), b.submit(good, item(good)),
                                       return_exceptions=True)
        after = await b.submit(good, item(good, value=5.0))
        await b.stop()
        return results, after

    results, after = run_async(main)
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results[:2])
    assert torch.all(results[2] == 2.0) and torch.all(after == 10.0)


def test_queue_limit_and_shutdown_refuse_with_503():
    rec = Recorder(delay_s=0.3)

    async def main():
        b = MicroBatcher(rec, max_batch=1, max_wait_s=0, max_queue=2)
        await b.start()
        key = ("decode", 4, 1, 1)
        running = asyncio.ensure_future(b.submit(key, item(key, value=1.0)))
        await asyncio.sleep(0.1)  # now in the model
        queued = [asyncio.ensure_future(b.submit(key, item(key, value=v))) for v in (2.0, 3.0)]
        await asyncio.sleep(0)
        with pytest.raises(Unavailable, match="queue is full"):
            await b.submit(key, item(key))
        await b.stop()  # the running batch finishes; the queued ones are refused
        with pytest.raises(Unavailable, match="shutting down"):
            await b.submit(key, item(key))
        return await running, await asyncio.gather(*queued, return_exceptions=True)

    first, refused = run_async(main)
    assert torch.all(first == 2.0)
    assert all(isinstance(r, Unavailable) and r.status == 503 for r in refused)
    assert len(rec.batches) == 1


def test_cancelled_requests_are_skipped():
    rec = Recorder(delay_s=0.2)

    async def main():
        b = MicroBatcher(rec, max_batch=1, max_wait_s=0)
        await b.start()
        key = ("decode", 4, 1, 1)
        first = asyncio.ensure_future(b.submit(key, item(key, value=1.0)))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(b.submit(key, item(key, value=2.0)))
        last = asyncio.ensure_future(b.submit(key, item(key, value=3.0)))
        await asyncio.sleep(0)
        gone.cancel()
        out = await asyncio.gather(first, last)
        await b.stop()
        return out

    first, last = run_async(main)
    assert torch.all(first == 2.0) and torch.all(last == 6.0)
    assert len(rec.batches) == 2  # the cancelled request never reached the model


# ---------------------------------------------------------------------------------------------- load
def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL_Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def raw(shape, seed=0, dtype=np.float32) -> bytes:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype).tobytes()


def test_load_with_malformed_requests(model_dir, local):
    """8 clients x 15 requests, about a third malformed: no 5xx, every refusal a JSON 4xx, every answer right."""
    rng = np.random.default_rng(0)
    valid = []  # (route, params, body, check(response))
    for seed, shape in enumerate([(1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 8, 8), (2, 4, 6, 6)]):
        z = torch.from_numpy(np.frombuffer(raw(shape, seed), np.float32).reshape(shape).copy())
        with torch.inference_mode():
            ref = local.decode(z).sample
        params = dict(shape=list(shape), dtype="float32", output_type="pt", partial_postprocess=False)
        valid.append(("decode", params, raw(shape, seed), ("tensor", ref)))
        uint8 = (ref / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)
        valid.append(("decode", dict(params, partial_postprocess=True), raw(shape, seed), ("uint8", uint8)))
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    with torch.inference_mode():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 * 2 - 1
        valid.append(("encode", dict(scaling_factor=0.5), png(image), ("tensor", local.encode(x).latent_dist.mode()
                                                                         * 0.5)))
    shape = [1, 4, 8, 8]
    malformed = [
        ("decode", dict(shape=shape, dtype="float32"), raw(shape)[:100], 400),
        ("decode", dict(shape=shape, dtype="float128"), raw(shape), 400),
        ("decode", dict(shape=shape, dtype="float32"), b"", 400),
        ("decode", dict(shape=[1, 4, 0, 8], dtype="float32"), b"", 400),
        ("decode", dict(shape=shape, dtype="float32", output_type="video"), raw(shape), 400),
        ("decode", dict(shape=[1, 4, 4096, 4096], dtype="float32"), raw(shape), 413),
        ("encode", {}, b"\xff\xd8\xff" + bytes(rng.integers(0, 256, 500, dtype=np.uint8)), 400),
        ("encode", {}, b"", 400),
        ("encode", dict(shape=[1, 3, 16, 16]), png(image), 400),
    ]
    n_clients, per_client = 8, 15
    plans = []
    for c in range(n_clients):
        r = np.random.default_rng(100 + c)
        plans.append([("bad", malformed[r.integers(len(malformed))]) if r.random() < 0.33
                      else ("ok", valid[r.integers(len(valid))]) for _ in range(per_client)])
    failures: list[str] = []
    statuses: list[int] = []

    def client(plan):
        with requests.Session() as session:
            for kind, (route, params, body, expect) in plan:
                resp = session.post(f"{server.url}/{route}", params=params, data=body, timeout=TIMEOUT)
                statuses.append(resp.status_code)
                if kind == "bad":
                    if resp.status_code != expect or resp.json().get("status") != expect:
                        failures.append(f"{route} {params}: {resp.status_code} {resp.text[:200]}")
                    continue
                if resp.status_code != 200:
                    failures.append(f"{route} {params}: {resp.status_code} {resp.text[:200]}")
                    continue
                what, ref = expect
                got = remote_utils.postprocess_encode(resp)  # the client's own reader
                if what == "uint8":
                    diff = (got.int() - ref.int()).abs()
                    ok = got.shape == ref.shape and diff.max() <= 1 and (diff > 0).float().mean() < 0.01
                else:
                    ok = got.shape == ref.shape and rel_err(got, ref) < 1e-5
                if not ok:
                    failures.append(f"{route} {params}: wrong answer")

    settings = ServeSettings(max_batch=8, batch_wait_ms=5)
    with ServerThread(create_app(Engine.from_folder(model_dir), settings)) as server:
        threads = [threading.Thread(target=client, args=(plan,)) for plan in plans]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 2)
        assert not any(t.is_alive() for t in threads)
        info = requests.get(f"{server.url}/info", timeout=TIMEOUT).json()
        assert requests.get(f"{server.url}/health", timeout=TIMEOUT).json() == {"status": "ok"}
    assert not failures, failures[:5]
    assert len(statuses) == n_clients * per_client and max(statuses) < 500
    n_valid = sum(kind == "ok" for plan in plans for kind, _ in plan)
    stats = info["batching"]
    assert stats["requests"] == n_valid
    assert stats["largest_batch"] >= 2 and stats["batches"] < n_valid  # concurrent requests were batched


# ---------------------------------------------------------------------------------------------- shutdown
class SlowEngine(Engine):
    """The real engine, slowed down so a request is surely in flight when shutdown starts."""

    def run(self, op, x):
        time.sleep(1.0)
        return super().run(op, x)


def test_graceful_shutdown_finishes_requests_in_flight(model_dir, local):
    model = AutoencoderKL.from_pretrained(model_dir)
    server = ServerThread(create_app(SlowEngine(model), ServeSettings())).start()
    z = torch.randn(1, 4, 4, 4)
    result = {}

    def call():
        result["out"] = remote_utils.remote_decode(f"{server.url}/decode", z, output_type="pt", return_type="pt",
                                                   do_scaling=False)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.4)  # the request is now waiting on the model
    started = time.monotonic()
    server.stop(timeout_s=30)
    t.join(TIMEOUT)
    assert time.monotonic() - started < 20
    with torch.inference_mode():
        assert rel_err(result["out"], local.decode(z).sample) < 1e-5
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/health", timeout=5)


# ---------------------------------------------------------------------------------------------- the command
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_with_token_and_stops_on_sigterm(model_dir, local):
    port, token = free_port(), "cli-token"
    env = dict(os.environ, KLVAE_SERVE_TOKEN=token)
    proc = subprocess.Popen([sys.executable, "-m", "klvae.cli", "serve", "--model", str(model_dir), "--port",
                             str(port), "--max-batch", "4", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, "/health", proc, 90)
        assert requests.get(f"{url}/info", timeout=TIMEOUT).status_code == 401
        info = requests.get(f"{url}/info", headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT).json()
        assert info["batching"]["max_batch"] == 4
        z = torch.randn(1, 4, 6, 6)
        out = remote_utils.remote_decode(f"http://klvae:{token}@127.0.0.1:{port}/decode", z, output_type="pt",
                                         return_type="pt", scaling_factor=2.0)
        with torch.inference_mode():
            assert rel_err(out, local.decode(z / 2.0).sample) < 1e-5
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err


def test_cli_refuses_a_missing_model_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "klvae.cli", "serve", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no such model folder" in proc.stderr


def test_module_entry_point_reports_bad_options(model_dir):
    cmd = [sys.executable, "-m", "klvae.serve", "--model", str(model_dir), "--max-batch", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "max_batch" in proc.stderr
    if not torch.cuda.is_available():
        cmd = [sys.executable, "-m", "klvae.serve", "--model", str(model_dir), "--device", "cuda"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "cannot put the model on device 'cuda'" in proc.stderr
