"""The reward server and its client, for real over 127.0.0.1 (OS-assigned ports, no fixed ones).

A served reward must give exactly the local reward's numbers; every malformed request gets a 4xx
and the server keeps serving; a failing reward gets a 5xx; the client retries what a retry can
fix, with exponential backoff, and otherwise stops with a RewardServerError naming the server.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpo_lite.rewards import client as client_module
from ddpo_lite.rewards import get_reward
from ddpo_lite.rewards.client import (
    RemoteReward,
    RewardServerError,
    encode_image,
    parse_retry_after,
)
from ddpo_lite.rewards.server import main, make_server

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# helpers


@contextmanager
def running(reward, **kwargs):
    """A RewardServer on 127.0.0.1, a free port, serving in a thread until the block ends."""
    server = make_server(reward, "127.0.0.1", 0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Distinct RGB images whose JPEG sizes differ: noise over a gradient, varied sizes."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        h, w = 24 + 8 * (i % 3), 32
        ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
        noise = rng.normal(0, 10 * (i + 1), (h, w, 3))
        images.append(Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8)))
    return images


def post(server, body: bytes, path: str = "/score") -> tuple[int, dict]:
    """POST raw bytes; the status and the decoded JSON answer."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def free_port() -> int:
    """A port nothing listens on (bound once by the OS, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def sleeps(monkeypatch):
    """Record the client's backoff sleeps instead of sleeping."""
    recorded: list[float] = []
    monkeypatch.setattr(client_module, "sleep", recorded.append)
    return recorded


@pytest.fixture(scope="module")
def jpeg_server():
    with running("jpeg_compressibility") as server:
        yield server


def assert_scores_like_local(url: str, n: int = 5, **client_options) -> None:
    images, prompts = make_images(n), [f"prompt {i}" for i in range(n)]
    metadata = [{"i": i} for i in range(n)]
    remote, remote_info = RemoteReward(url, **client_options)(images, prompts, metadata)
    local, local_info = get_reward("jpeg_compressibility")(images, prompts, metadata)
    assert remote.dtype == np.float64 and remote.shape == (n,)
    np.testing.assert_array_equal(remote, local)  # exact: JPEG sizes of the same pixels
    np.testing.assert_array_equal(remote_info["jpeg_kb"], local_info["jpeg_kb"])
    assert len(set(local.tolist())) == n  # distinct values, so an order mix-up would show


# ---------------------------------------------------------------------------------------------
# the happy path


def test_remote_scores_equal_local_and_health(jpeg_server):
    assert_scores_like_local(jpeg_server.url, n=5)
    assert_scores_like_local(jpeg_server.url, n=5, batch_size=2)  # client splits: 2 + 2 + 1
    assert RemoteReward(jpeg_server.url).health() == {
        "status": "ok",
        "reward": "jpeg_compressibility",
        "max_request_bytes": jpeg_server.max_request_bytes,
        "max_batch": jpeg_server.max_batch,
        "max_concurrent": jpeg_server.max_concurrent,
        "max_pixels": jpeg_server.pixels.limit,
    }
    rewards, info = RemoteReward(jpeg_server.url)([], [], [])
    assert rewards.shape == (0,) and info == {}


def test_server_splits_batches_in_order():
    """5 images with max_batch 2 reach the reward as 2 + 2 + 1, answers in request order; the
    client's own batch_size 3 nests inside (3 -> 2 + 1, 2 -> 2)."""
    calls: list[int] = []

    def mean_pixel(images, prompts, metadata):
        calls.append(len(images))
        values = np.array([np.asarray(im).mean() for im in images])
        return values, {"prompt_len": [len(p) for p in prompts], "chunk": len(calls)}

    images = [Image.new("RGB", (8, 8), (v, v, v)) for v in (10, 20, 30, 40, 50)]
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    with running(mean_pixel, max_batch=2) as server:
        rewards, info = RemoteReward(server.url)(images, prompts)
        assert calls == [2, 2, 1]
        np.testing.assert_array_equal(rewards, [10, 20, 30, 40, 50])
        np.testing.assert_array_equal(info["prompt_len"], [1, 2, 3, 4, 5])
        # a scalar that differs between chunks arrives per sample
        np.testing.assert_array_equal(info["chunk"], [1, 1, 2, 2, 3])

        calls.clear()
        rewards, _ = RemoteReward(server.url, batch_size=3)(images, prompts)
        assert calls == [2, 1, 2]
        np.testing.assert_array_equal(rewards, [10, 20, 30, 40, 50])


def test_reward_calls_are_serialised():
    """Concurrent requests never run the reward concurrently (one model, one GPU)."""
    active, most = [0], [0]
    guard = threading.Lock()

    def slow(images, prompts, metadata):
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.05)
        with guard:
            active[0] -= 1
        return np.full(len(images), float(prompts[0])), {}

    with running(slow) as server:
        results = {}

        def score(k):
            results[k] = RemoteReward(server.url)(make_images(1), [str(k)])[0]

        threads = [threading.Thread(target=score, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert {k: float(v[0]) for k, v in results.items()} == {0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0}
    assert most[0] == 1


def test_nan_and_inf_round_trip_as_strict_json():
    def odd(images, prompts, metadata):
        values = np.array([np.nan, np.inf, -np.inf, 1.5])
        return values, {"raw": values.copy(), "scale": 2.0, "name": "odd"}

    def no_nan_literals(token):
        raise AssertionError(f"the answer contains {token}, which strict JSON does not allow")

    images = make_images(4)
    with running(odd) as server:
        body = json.dumps({"images": [encode_image(im) for im in images], "prompts": list("abcd")})
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
        conn.request("POST", "/score", body=body.encode())
        answer = json.loads(conn.getresponse().read(), parse_constant=no_nan_literals)
        conn.close()
        assert answer["rewards"] == [None, None, None, 1.5]

        rewards, info = RemoteReward(server.url)(images, list("abcd"))
    np.testing.assert_array_equal(np.isnan(rewards), [True, True, True, False])
    assert rewards[3] == 1.5
    np.testing.assert_array_equal(np.isnan(info["raw"]), [True, True, True, False])
    assert info["scale"] == 2.0 and info["name"] == "odd"


# ---------------------------------------------------------------------------------------------
# bad requests: 4xx, and the server keeps serving


def _png() -> str:
    return encode_image(make_images(1)[0])


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _jpeg() -> str:
    buffer = io.BytesIO()
    make_images(1)[0].save(buffer, format="JPEG")
    return _b64(buffer.getvalue())


def _truncated_png() -> str:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    return _b64(buffer.getvalue()[: buffer.tell() // 2])


def _huge_png() -> str:
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")  # a few kB, 25 M pixels
    return _b64(buffer.getvalue())


BAD_REQUESTS = {
    "not json": (lambda: b"{images: [", "not valid JSON"),
    "not an object": (lambda: b"[1, 2]", "must be a JSON object"),
    "missing prompts": (lambda: {"images": [_png()]}, "missing field 'prompts'"),
    "missing images": (lambda: {"prompts": ["a"]}, "missing field 'images'"),
    "unknown field": (
        lambda: {"images": [_png()], "prompts": ["a"], "image": []},
        "unknown field(s) ['image']",
    ),
    "images not a list": (lambda: {"images": _png(), "prompts": ["a"]}, "'images' must be a list"),
    "prompt not a string": (lambda: {"images": [_png()], "prompts": [3]}, "'prompts' must be"),
    "metadata not dicts": (
        lambda: {"images": [_png()], "prompts": ["a"], "metadata": ["x"]},
        "'metadata' must be a list of dicts",
    ),
    "fewer prompts": (
        lambda: {"images": [_png(), _png()], "prompts": ["a"]},
        "2 images, 1 prompts and 2 metadata",
    ),
    "more metadata": (
        lambda: {"images": [_png()], "prompts": ["a"], "metadata": [{}, {}]},
        "1 images, 1 prompts and 2 metadata",
    ),
    "bad base64": (lambda: {"images": ["not*base64"], "prompts": ["a"]}, "not valid base64"),
    "not an image": (lambda: {"images": [_b64(b"hello")], "prompts": ["a"]}, "not a readable"),
    "jpeg not png": (lambda: {"images": [_jpeg()], "prompts": ["a"]}, "is JPEG, not PNG"),
    "truncated png": (lambda: {"images": [_truncated_png()], "prompts": ["a"]}, "decodable PNG"),
    "too many pixels": (lambda: {"images": [_huge_png()], "prompts": ["a"]}, "5000x5000"),
    "nested too deeply": (lambda: b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "nested metadata": (
        lambda: (
            b'{"images": [], "prompts": [], "metadata": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
        ),
        "nested too deeply",
    ),
    "id not a string": (lambda: {"images": [], "prompts": [], "id": 3}, "'id' must be a string"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_400_and_server_keeps_serving(jpeg_server, case):
    make_body, expected = BAD_REQUESTS[case]
    body = make_body()
    body = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, answer = post(jpeg_server, body)
    assert status == 400
    assert expected in answer["error"]
    assert_scores_like_local(jpeg_server.url, n=2)


def test_wrong_path_method_and_missing_length(jpeg_server):
    assert post(jpeg_server, b"{}", path="/nope")[0] == 404
    for method, path, allow in [
        ("GET", "/score", "POST"),
        ("PUT", "/score", "POST"),
        ("DELETE", "/health", "GET"),
        ("FOO", "/x", "GET, POST"),
        ("OPTIONS", "/score", "POST"),
    ]:
        conn = http.client.HTTPConnection(*jpeg_server.server_address[:2], timeout=10)
        conn.request(method, path, body=b"{}")
        response = conn.getresponse()
        assert (response.status, response.getheader("Allow")) == (405, allow), method
        assert f"{method} is not allowed here" in json.loads(response.read())["error"]
        conn.close()
    conn = http.client.HTTPConnection(*jpeg_server.server_address[:2], timeout=10)
    conn.putrequest("POST", "/score")
    conn.endheaders()  # no Content-Length
    response = conn.getresponse()
    assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
    conn.close()
    assert_scores_like_local(jpeg_server.url, n=2)


def test_oversized_request_is_413_before_reading(sleeps):
    with running("jpeg_compressibility", max_request_bytes=20_000) as server:
        # a Content-Length of 1 TB with a 2-byte body: answered at once from the header alone
        # (a server that tried to read the body would wait out this client's 10 s timeout)
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
        started = time.monotonic()
        conn.putrequest("POST", "/score")
        conn.putheader("Content-Length", str(10**12))
        conn.endheaders(b"{}")
        response = conn.getresponse()
        assert response.status == 413
        assert "over this server's limit of 20000 bytes" in json.loads(response.read())["error"]
        assert time.monotonic() - started < 5
        conn.close()

        # a body really sent, over the limit and over what socket buffers hold (8 MB): the
        # server drains it after answering, so the client reads the 413 instead of a broken pipe
        for _ in range(2):
            status, answer = post(server, b" " * 8_000_000)
            assert status == 413 and "8000000 bytes" in answer["error"]

        # through the client: a 4xx is our bug, raised at once, no retries
        noise = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
        big = [Image.fromarray(noise)] * 3  # ~4 MB of base64 PNG each
        with pytest.raises(RewardServerError, match=r"refused the request \(HTTP 413: ") as err:
            RemoteReward(server.url, retries=3, backoff=0.01)(big, ["p"] * 3)
        assert server.url in str(err.value) and sleeps == []

        assert_scores_like_local(server.url, n=2)  # small requests still served


# ---------------------------------------------------------------------------------------------
# the reward fails: 5xx, retried, then a RewardServerError; still serving


def test_reward_that_raises_is_500_retried_then_error(sleeps):
    calls = []

    def fragile(images, prompts, metadata):
        calls.append(prompts)
        if "boom" in prompts:
            raise RuntimeError("the model fell over")
        if "short" in prompts:
            return np.zeros(len(images) - 1), {}
        if "flags" in prompts:
            return np.ones(len(images), dtype=bool), {}
        return np.arange(len(images), dtype=float), {}

    images = make_images(2)
    with running(fragile, name="fragile") as server:
        body = json.dumps({"images": [encode_image(im) for im in images], "prompts": ["boom", "x"]})
        status, answer = post(server, body.encode())
        assert status == 500
        assert answer["error"] == "reward 'fragile' raised RuntimeError: the model fell over"

        body = json.dumps(
            {"images": [encode_image(im) for im in images], "prompts": ["short", "x"]}
        )
        status, answer = post(server, body.encode())
        assert status == 500
        assert answer["error"] == "reward 'fragile' returned rewards of shape (1,) for 2 images"

        body = json.dumps(
            {"images": [encode_image(im) for im in images], "prompts": ["flags", "x"]}
        )
        status, answer = post(server, body.encode())
        assert status == 500 and answer["error"].startswith(
            "reward 'fragile' returned non-numeric rewards: booleans, not numbers"
        )

        calls.clear()
        remote = RemoteReward(server.url, retries=2, backoff=0.01)
        with pytest.raises(RewardServerError) as err:
            remote(images, ["boom", "x"])
        assert str(err.value) == (
            f"reward server {server.url} failed after 3 attempts "
            "(HTTP 500: reward 'fragile' raised RuntimeError: the model fell over)"
        )
        assert len(calls) == 3 and sleeps == [0.01, 0.02]

        rewards, _ = remote(images, ["fine", "x"])  # and it still serves
        np.testing.assert_array_equal(rewards, [0.0, 1.0])


# ---------------------------------------------------------------------------------------------
# the server is down, comes up late, is too slow, or answers nonsense


def test_server_down_raises_after_retries_with_backoff(sleeps):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RewardServerError) as err:
        RemoteReward(url, retries=3, backoff=0.01)(make_images(2), ["a", "b"])
    assert str(err.value) == (
        f"reward server {url} did not answer after 4 attempts (connection refused)"
    )
    assert sleeps == [0.01, 0.02, 0.04]  # exponential backoff between the 4 attempts


def test_server_that_comes_up_during_retries(monkeypatch):
    port = free_port()
    servers = []
    waited = []

    def start(seconds):  # the client's backoff sleep: the server comes up meanwhile
        waited.append(seconds)
        if not servers:
            server = make_server("jpeg_compressibility", "127.0.0.1", port)
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
            servers.append(server)

    monkeypatch.setattr(client_module, "sleep", start)
    try:
        assert_scores_like_local(f"http://127.0.0.1:{port}", n=3, retries=3, backoff=0.01)
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert waited == [0.01]  # one refused attempt, one backoff, then the answer


def test_one_timeout_budget_covers_every_attempt_of_a_batch(sleeps):
    """reward.timeout bounds the whole batch, retries and backoff included: a server that
    never answers in time stops the call after `timeout` seconds, not attempts x timeout."""

    def slow(images, prompts, metadata):
        time.sleep(1.0)
        return np.zeros(len(images)), {}

    with running(slow) as server:
        started = time.monotonic()
        with pytest.raises(RewardServerError) as err:
            RemoteReward(server.url, timeout=0.3, retries=5, backoff=0.01)(make_images(1), ["a"])
        elapsed = time.monotonic() - started
    assert str(err.value) == (
        f"reward server {server.url} did not answer within reward.timeout = 0.3s for the batch "
        "(1 attempt; timed out after 0.3s)"
    )
    assert elapsed < 0.9 and sleeps == []  # no second 0.3 s attempt after the first


@contextmanager
def fake_server(answer):
    """A plain HTTP server whose POST answer is `answer(request) -> (status, headers, body)`."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, headers, body = answer(request)
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802  (where a followed redirect would land)
            body = b'{"rewards": [123.0, 123.0], "info": {}}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _json(request, **fields):
    return 200, {}, json.dumps({"id": request["id"], "info": {}, **fields}).encode()


WRONG_ANSWERS = {
    "wrong length": (lambda r: _json(r, rewards=[1.0]), "answered 1 rewards for 2 images"),
    "booleans": (
        lambda r: _json(r, rewards=[True, False]),
        "2 reward(s) that are not JSON numbers, such as True (bool)",
    ),
    "numeric strings": (
        lambda r: _json(r, rewards=["1.5", 2.0]),
        "1 reward(s) that are not JSON numbers, such as '1.5' (str)",
    ),
    "another request's id": (
        lambda r: (200, {}, json.dumps({"id": "x" + r["id"], "rewards": [1, 2]}).encode()),
        "answered with request id 'x",
    ),
    "no id": (
        lambda r: (200, {}, b'{"rewards": [1.0, 2.0], "info": {}}'),
        "answered with request id None",
    ),
    "a redirect": (
        lambda r: (302, {"Location": "/elsewhere"}, b""),
        "answered a redirect (HTTP 302 to /elsewhere), which ddpo-lite does not follow",
    ),
    "a permanent redirect": (
        lambda r: (308, {"Location": "http://127.0.0.1:1/score"}, b""),
        "answered a redirect (HTTP 308",
    ),
}


@pytest.mark.parametrize("case", list(WRONG_ANSWERS))
def test_client_accepts_only_the_answer_it_asked_for(sleeps, case):
    """No redirects followed (a 302 once turned the POST into a GET without images, and the run
    trained on its answer); rewards are JSON numbers or null, one per image, for this request."""
    answer, expected = WRONG_ANSWERS[case]
    with fake_server(answer) as url:
        with pytest.raises(RewardServerError) as err:
            RemoteReward(url, retries=3, backoff=0.01)(make_images(2), ["a", "b"])
    assert str(err.value).startswith(f"reward server {url} ")
    assert expected in str(err.value)
    assert sleeps == []  # a wrong answer is not retried

    # the right answer from the same kind of server is taken
    with fake_server(lambda r: _json(r, rewards=[1, None])) as url:
        rewards, _ = RemoteReward(url)(make_images(2), ["a", "b"])
    np.testing.assert_array_equal(rewards, [1.0, np.nan])


def test_client_checks_its_arguments():
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        RemoteReward("127.0.0.1:8123")
    with pytest.raises(ValueError, match="retries >= 0"):
        RemoteReward("http://127.0.0.1:8123", retries=-1)
    with pytest.raises(ValueError, match="2 images, 1 prompts"):
        RemoteReward("http://127.0.0.1:8123")(make_images(2), ["a"])


# ---------------------------------------------------------------------------------------------
# Retry-After: a busy server (429 or 503) says how long to wait


def _busy(status: int = 503, retry_after: str | None = "1"):
    """A busy answer, with a Retry-After header unless `retry_after` is None."""
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    return status, headers, b'{"error": "busy: retry shortly"}'


def _busy_then_ok(busy_answers: int, *busy_args):
    """An answer that is busy the first `busy_answers` times, then scores [1, 2]; and its calls."""
    calls: list[int] = []

    def answer(request):
        calls.append(1)
        return _busy(*busy_args) if len(calls) <= busy_answers else _json(request, rewards=[1, 2])

    return answer, calls


def test_retry_after_is_waited_out_instead_of_a_retry_storm():
    """A server busy for 1 s says Retry-After: 1; the client waits it out and retries once, where
    its 0.01 s backoff alone would have sent ~7 requests into the busy second."""
    arrivals: list[float] = []

    def answer(request):
        arrivals.append(time.monotonic())
        if arrivals[-1] - arrivals[0] < 1.0:
            return _busy(503, "1")
        return _json(request, rewards=[1.0, 2.0])

    with fake_server(answer) as url:
        remote = RemoteReward(url, timeout=10, retries=10, backoff=0.01)
        started = time.monotonic()
        rewards, _ = remote(make_images(2), ["a", "b"])
        elapsed = time.monotonic() - started
    assert rewards.tolist() == [1.0, 2.0]
    assert len(arrivals) == 2 and elapsed >= 1.0


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_as_an_http_date(sleeps, status):
    """An HTTP-date 30 s ahead is a ~30 s wait (the date has whole seconds), on 429 as on 503."""
    when = datetime.now(UTC) + timedelta(seconds=30)
    answer, calls = _busy_then_ok(1, status, email.utils.format_datetime(when, usegmt=True))
    with fake_server(answer) as url:
        remote = RemoteReward(url, timeout=60, retries=1, backoff=0.01)
        rewards, _ = remote(make_images(2), ["a", "b"])
    assert rewards.tolist() == [1.0, 2.0] and len(calls) == 2
    assert len(sleeps) == 1 and 28 < sleeps[0] <= 30


def test_retry_after_past_the_budget_fails_at_once():
    """A server asking for 120 s when the batch has ~10 s left: one line naming both and the fix,
    at once rather than after the 10 s."""
    with fake_server(lambda request: _busy(503, "120")) as url:
        remote = RemoteReward(url, timeout=10, retries=3, backoff=0.01)
        started = time.monotonic()
        with pytest.raises(RewardServerError) as err:
            remote(make_images(2), ["a", "b"])
        elapsed = time.monotonic() - started
    assert re.fullmatch(
        rf"reward server {re.escape(url)} asked to wait 120s \(Retry-After\) but the batch has "
        r"(9\.\d|10\.0)s left of reward\.timeout = 10s: raise reward\.timeout above 12\ds "
        r"\(HTTP 503: busy: retry shortly\)",
        str(err.value),
    )
    assert elapsed < 2


@pytest.mark.parametrize("header", ["soon", "-1", "1.5", "", "Fri, 32 Foo 2025 25:61:00 GMT"])
def test_a_malformed_retry_after_falls_back_to_the_backoff(sleeps, header):
    answer, calls = _busy_then_ok(2, 503, header)
    with fake_server(answer) as url:
        rewards, _ = RemoteReward(url, retries=3, backoff=0.01)(make_images(2), ["a", "b"])
    assert rewards.tolist() == [1.0, 2.0] and len(calls) == 3
    assert sleeps == [0.01, 0.02]


def test_429_is_retried_and_other_4xx_are_not(sleeps):
    """429 (with no Retry-After, or one shorter than the backoff) waits the backoff; a 400 is
    our request's fault and raises at once, its Retry-After ignored."""
    answer, calls = _busy_then_ok(2, 429, None)
    with fake_server(answer) as url:
        rewards, _ = RemoteReward(url, retries=3, backoff=0.01)(make_images(2), ["a", "b"])
    assert rewards.tolist() == [1.0, 2.0] and sleeps == [0.01, 0.02]

    answer, calls = _busy_then_ok(1, 429, "0")
    sleeps.clear()
    with fake_server(answer) as url:
        RemoteReward(url, retries=3, backoff=0.01)(make_images(2), ["a", "b"])
    assert sleeps == [0.01] and len(calls) == 2

    sleeps.clear()
    with fake_server(lambda request: (400, {"Retry-After": "0"}, b'{"error": "bad"}')) as url:
        with pytest.raises(RewardServerError, match=r"refused the request \(HTTP 400: bad\)$"):
            RemoteReward(url, retries=3, backoff=0.01)(make_images(2), ["a", "b"])
    assert sleeps == []


def test_parse_retry_after():
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:45 GMT", now) == 45.0
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:45 -0000", now) == 45.0  # naive: UTC
    assert parse_retry_after("Wed, 01 Jan 2025 13:00:45 +0100", now) == 45.0
    assert parse_retry_after("Tue, 31 Dec 2024 12:00:00 GMT", now) == 0.0  # past: no wait
    for malformed in [None, "", "soon", "-1", "1.5", "\u00b2", "Fri, 32 Foo 2025 25:61:00 GMT"]:
        assert parse_retry_after(malformed, now) is None


# ---------------------------------------------------------------------------------------------
# the command line, as a separate process that is killed mid-use


def test_main_unknown_reward_is_one_line(capsys):
    assert main(["no_such_reward", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown reward 'no_such_reward'") and err.count("\n") == 1


def test_subprocess_server_killed_mid_use(tmp_path):
    log_path = tmp_path / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "ddpo_lite.rewards.server", "jpeg_compressibility"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*command, "--port", "0"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        url = _wait_for_url(log_path, process)
        assert_scores_like_local(url, n=4, retries=0)

        # a long call (one image per request) in flight when the server is killed
        outcome = {}

        def long_call():
            remote = RemoteReward(url, batch_size=1, retries=2, backoff=0.01, timeout=10)
            try:
                outcome["rewards"] = remote(make_images(4) * 500, ["p"] * 2000)
            except Exception as err:
                outcome["error"] = err

        caller = threading.Thread(target=long_call)
        caller.start()
        _wait_for(lambda: log_path.read_text().count("POST /score 200 1 images") >= 3)
        process.kill()
        process.wait(10)
        caller.join(30)
        assert not caller.is_alive() and "rewards" not in outcome
        error = outcome["error"]
        assert isinstance(error, RewardServerError)
        assert str(error) == f"reward server {url} did not answer after 3 attempts " + (
            "(connection refused)"
        )
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _wait_for_url(log_path: Path, process: subprocess.Popen) -> str:
    """The server's URL from its first log line (it was started with --port 0)."""
    found = []

    def announced():
        assert process.poll() is None, f"the server exited: {log_path.read_text()}"
        match = re.search(r"at (http://127\.0\.0\.1:\d+) ", log_path.read_text())
        found.extend([match.group(1)] if match else [])
        return bool(found)

    _wait_for(announced)
    return found[0]


# ---------------------------------------------------------------------------------------------
# slow, greedy and many clients: a deadline per request, bounded memory, a backlog that holds


def test_a_client_dripping_its_request_is_cut_off_with_408():
    """The deadline covers the whole request (headers and body), not each read: a client that
    sends a byte every 0.3 s (well within the 30 s per-read timeout) is answered 408."""
    with running("jpeg_compressibility", request_deadline=1.0) as server:
        for head_only in (True, False):
            sock = socket.create_connection(server.server_address[:2], timeout=10)
            started = time.monotonic()
            request = b"POST /score HTTP/1.1\r\nHost: x\r\n"
            if not head_only:  # the headers arrive at once, the body drips
                sock.sendall(request + b"Content-Length: 1000\r\n\r\n")
                request = b"{" * 1000
            answer = b""
            try:
                for byte in request:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.3)
                    if time.monotonic() - started > 6:
                        break
            except OSError:  # cut off: the server closed its side
                pass
            try:
                while chunk := sock.recv(4096):
                    answer += chunk
            except OSError:
                pass
            sock.close()
            assert answer.startswith(b"HTTP/1.0 408"), answer[:80]
            assert b"did not arrive within 1s" in answer
            assert time.monotonic() - started < 4
        assert_scores_like_local(server.url, n=2)  # and it still serves


def test_concurrent_requests_are_bounded_and_over_the_limit_get_503(monkeypatch):
    """At most max_concurrent requests are read, decoded and scored at once; one that finds
    no slot within the queue wait gets 503 with Retry-After, and the client's retry succeeds."""
    import ddpo_lite.rewards.server as server_module

    monkeypatch.setattr(server_module, "QUEUE_SECONDS", 0.2)
    release = threading.Event()

    def slow(images, prompts, metadata):
        release.wait(10)
        return np.zeros(len(images)), {}

    body = json.dumps({"images": [_png()], "prompts": ["a"]}).encode()
    with running(slow, max_concurrent=1) as server:
        first = threading.Thread(target=post, args=(server, body))
        first.start()
        time.sleep(0.3)  # the first request holds the only slot
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
        conn.request("POST", "/score", body=body)
        response = conn.getresponse()
        assert response.status == 503 and response.getheader("Retry-After") == "1"
        assert "busy: 1 requests in progress" in json.loads(response.read())["error"]
        conn.close()
        release.set()
        first.join(10)
        rewards, _ = RemoteReward(server.url, retries=3, backoff=0.05)(make_images(1), ["a"])
        assert rewards.tolist() == [0.0]


def test_decoded_pixels_are_bounded_per_server():
    """One request over the server's pixel budget gets 413; requests within it share it (the
    budget is given back after each, so the server keeps serving)."""
    with running("jpeg_compressibility", max_pixels=40 * 40) as server:
        big = Image.new("RGB", (64, 64))
        body = json.dumps({"images": [encode_image(big)], "prompts": ["a"]}).encode()
        status, answer = post(server, body)
        assert status == 413 and "over this server's budget of 1600" in answer["error"]
        for _ in range(3):
            assert_scores_like_local(server.url, n=1)  # 24x32 fits, again and again
        assert server.pixels.used == 0


def test_a_hundred_concurrent_clients_are_all_answered():
    """A bounded loopback load test: 100 clients at once, each one request of 2 small images;
    every one is answered 200 (no resets: the listen backlog is 256, not 5)."""
    images = make_images(2)
    body = json.dumps({"images": [encode_image(im) for im in images], "prompts": ["a", "b"]})
    outcomes: list = [None] * 100
    barrier = threading.Barrier(100)

    def client(i):
        barrier.wait(10)
        try:
            outcomes[i] = post(server, body.encode())[0]
        except Exception as err:  # noqa: BLE001 - recorded and asserted below
            outcomes[i] = repr(err)

    started = time.monotonic()
    with running("jpeg_compressibility") as server:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(100)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert outcomes == [200] * 100
    assert time.monotonic() - started < 20


def test_fuzzed_requests_get_an_http_answer_and_never_a_5xx():
    """Random bodies, shaped like the documented schema or not, are answered (no closed
    connection) with 200 or a 4xx; never a 5xx (the reward itself is fine)."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    png = _png()
    leaf = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)
    )
    value = st.recursive(
        leaf,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=10,
    )
    field = st.one_of(value, st.lists(st.sampled_from([png, "x", ""]), max_size=3))
    body = st.one_of(
        st.binary(max_size=200),
        st.dictionaries(
            st.sampled_from(["images", "prompts", "metadata", "id", "other"]), field
        ).map(lambda d: json.dumps(d).encode()),
    )
    statuses = []
    with running("jpeg_compressibility") as server:

        @hypothesis.settings(max_examples=150, deadline=None, database=None)
        @hypothesis.given(body)
        def answered(raw):
            status, answer = post(server, raw)
            statuses.append(status)
            assert status == 200 or 400 <= status < 500, (status, answer)

        answered()
    assert len(statuses) >= 150 and 400 in statuses
