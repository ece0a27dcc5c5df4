"""The reward server: any registered reward (or your own callable) served over HTTP.

Why: a big reward model can live on another GPU or machine than the trainer, and several runs
can share it. The protocol is JSON with base64 PNG images; nothing is ever unpickled, so a
request can only ever be data (the DDPO paper's LLaVA server unpickles its requests: not ours).

    POST /score   {"images": [b64 PNG, ...], "prompts": [str, ...], "metadata": [{...}, ...],
                   "id": str}
               -> 200 {"rewards": [float | null, ...], "info": {name: [per-sample] | scalar},
                       "id": the request's id}
    GET  /health -> 200 {"status": "ok", "reward": NAME, "max_request_bytes": N, "max_batch": M,
                         "max_concurrent": C, "max_pixels": P}

`metadata` may be left out (one empty dict per image), and `id` (a string of at most 200
characters, echoed back so that the client can tell its answer); any other field is an error. Non-finite
floats are sent as null (strict JSON has no NaN); `RemoteReward` reads them back as NaN.
Errors answer {"error": message}: 400 a malformed request (bad JSON, JSON nested too deeply,
wrong or missing fields, lengths that disagree, an image that is not a decodable PNG or is too
large), 404 a wrong path, 405 a wrong method (with an `Allow` header), 408 a request not read
within `request_deadline` seconds (headers and body, whatever the pace: a client dripping bytes
is cut off), 411 no Content-Length, 413 a body over `max_request_bytes` (checked before reading
it) or images over the server's pixel budget, 503 (with `Retry-After`) when `max_concurrent`
requests are already being read, decoded and scored or the pixel budget is taken, 500 the reward
raised or returned the wrong shape. The server keeps serving after every error.

Memory is bounded per server, not per request: at most `max_concurrent` requests (default
DEFAULT_MAX_CONCURRENT) hold a body at once, and their decoded images together hold at most
`max_pixels` pixels (default DEFAULT_MAX_PIXELS = 2**28, e.g. 16 images of 4096x4096: ~0.8 GB as
RGB); a request that waits more than QUEUE_SECONDS for either gets 503. Connections beyond the
workers wait in a listen backlog of REQUEST_QUEUE_SIZE.

A request is scored in chunks of at most `max_batch` images, in order, one chunk at a time
under a lock (the reward is typically one model on one GPU); decoding runs outside the lock.

Run:

    python -m ddpo_lite.rewards.server jpeg_compressibility --port 8123
    ddpo-lite serve-reward aesthetic --host 0.0.0.0 --port 8123 --device cuda:1

and in Python, `serve(reward)` (blocking) or `make_server(reward)` (yours to run and stop).
The client is `ddpo_lite.rewards.client.RemoteReward`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import logging
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image

from ddpo_lite.rewards.client import merge_infos, to_jsonable
from ddpo_lite.rewards.compose import as_reward_values
from ddpo_lite.rewards.registry import Reward, UnknownRewardError, get_reward

log = logging.getLogger("ddpo_lite.reward_server")

DEFAULT_PORT = 8123
DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20  # 64 MiB: ~100 SD-1.5 images at 512x512 as base64 PNG
DEFAULT_MAX_BATCH = 16
MAX_IMAGE_PIXELS = 4096 * 4096  # per image; a PNG's header is checked before it is decoded
MAX_REQUEST_PIXELS = 2**28  # per request (~0.8 GB as RGB): bounds what decoding can allocate
DEFAULT_MAX_PIXELS = 2**28  # decoded pixels held at once, over every request of the server
DEFAULT_MAX_CONCURRENT = 32  # requests read, decoded and scored at once (the rest wait, then 503)
DEFAULT_REQUEST_DEADLINE = 60.0  # seconds to send headers and body, whatever the pace
QUEUE_SECONDS = 30.0  # how long a request waits for a slot or for pixel budget before a 503
REQUEST_QUEUE_SIZE = 256  # the listen backlog: connections not yet accepted
_FIELDS = ("images", "prompts", "metadata", "id")
MAX_ID_CHARS = 200


class BadRequest(ValueError):
    """The request is malformed; answered with `status` and the message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class RewardOutputError(ValueError):
    """The reward returned the wrong shape or type; answered 500 naming the reward."""


class PixelBudget:
    """Decoded pixels held at once by every request of a server: `reserve` waits (bounded) for
    room and raises BadRequest 413 (never fits) or 503 (busy); `release` gives it back."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._room = threading.Condition()

    def reserve(self, pixels: int, wait: float = QUEUE_SECONDS) -> None:
        if pixels > self.limit:
            raise BadRequest(
                f"the images add up to {pixels} pixels, over this server's budget of "
                f"{self.limit}: send fewer or smaller images per request",
                413,
            )
        with self._room:
            if not self._room.wait_for(lambda: self.used + pixels <= self.limit, wait):
                raise BadRequest("the server is decoding other requests; retry shortly", 503)
            self.used += pixels

    def release(self, pixels: int) -> None:
        with self._room:
            self.used -= pixels
            self._room.notify_all()


class RewardServer(ThreadingHTTPServer):
    """A threading HTTP server holding one reward, its name, limits and the lock around it."""

    daemon_threads = True
    request_queue_size = REQUEST_QUEUE_SIZE  # socketserver's default of 5 resets a burst

    def __init__(
        self,
        address: tuple[str, int],
        reward: Reward,
        name: str,
        max_request_bytes: int,
        max_batch: int,
        *,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        request_deadline: float = DEFAULT_REQUEST_DEADLINE,
    ):
        self.reward = reward
        self.reward_name = name
        self.max_request_bytes = max_request_bytes
        self.max_batch = max_batch
        self.reward_lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(max_concurrent)
        self.max_concurrent = max_concurrent
        self.pixels = PixelBudget(max_pixels)
        self.request_deadline = float(request_deadline)
        self._reading: dict[_Handler, float] = {}  # handler -> monotonic deadline
        self._reading_lock = threading.Lock()
        self._closed = threading.Event()
        super().__init__(address, _Handler)
        threading.Thread(target=self._cut_off_slow_clients, daemon=True).start()

    def watch(self, handler: _Handler, seconds: float | None) -> float:
        """Cut `handler`'s connection off with a 408 unless it is unwatched within `seconds`;
        None unwatches it. Returns the seconds that were left (0 when it was not watched)."""
        with self._reading_lock:
            left = self._reading.pop(handler, time.monotonic()) - time.monotonic()
            if seconds is not None:
                self._reading[handler] = time.monotonic() + seconds
        return max(left, 0.0)

    def _cut_off_slow_clients(self) -> None:
        while not self._closed.wait(0.2):
            now = time.monotonic()
            with self._reading_lock:
                late = [h for h, deadline in self._reading.items() if deadline < now]
                for handler in late:
                    del self._reading[handler]
            for handler in late:
                handler.cut_off()

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()

    def server_bind(self) -> None:
        # HTTPServer.server_bind also does a reverse DNS lookup of the host (socket.getfqdn),
        # which can stall for seconds where DNS is unreachable; nothing here uses its result
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(
    reward: Reward | str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_batch: int | None = None,
    reward_options: dict | None = None,
    name: str | None = None,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    request_deadline: float = DEFAULT_REQUEST_DEADLINE,
) -> RewardServer:
    """A bound, not yet serving `RewardServer`; call `serve_forever()` (e.g. in a thread) and
    `shutdown()` + `server_close()` to stop. `port=0` picks a free port (see `.url`).

    `reward` is a registered name (built with `get_reward(name, **reward_options)`) or a callable;
    `name` (what /health reports) defaults to the registered name or the callable's name.
    `max_batch` defaults to the reward's `batch_size` attribute, else DEFAULT_MAX_BATCH.
    """
    if isinstance(reward, str):
        name = name or reward
        reward = get_reward(reward, **(reward_options or {}))
    elif reward_options:
        raise ValueError("reward_options apply to a reward given by name, not to a callable")
    else:
        name = name or getattr(reward, "name", None) or getattr(reward, "__name__", None)
        name = name or type(reward).__name__
    if max_batch is None:
        max_batch = getattr(reward, "batch_size", None) or DEFAULT_MAX_BATCH
    if min(max_request_bytes, max_batch, max_concurrent, max_pixels) < 1 or request_deadline <= 0:
        raise ValueError(
            f"max_request_bytes ({max_request_bytes}), max_batch ({max_batch}), max_concurrent "
            f"({max_concurrent}) and max_pixels ({max_pixels}) must be >= 1, request_deadline "
            f"({request_deadline}) > 0"
        )
    return RewardServer(
        (host, port),
        reward,
        name,
        int(max_request_bytes),
        int(max_batch),
        max_concurrent=int(max_concurrent),
        max_pixels=int(max_pixels),
        request_deadline=request_deadline,
    )


def serve(
    reward: Reward | str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_batch: int | None = None,
    ready: threading.Event | None = None,
    reward_options: dict | None = None,
    name: str | None = None,
) -> None:
    """Serve `reward` until interrupted (blocking). `ready` is set once the port is bound."""
    server = make_server(
        reward,
        host,
        port,
        max_request_bytes=max_request_bytes,
        max_batch=max_batch,
        reward_options=reward_options,
        name=name,
    )
    log.info(
        "serving reward %r at %s (POST /score, GET /health; max %d bytes per request, "
        "batches of %d)",
        server.reward_name,
        server.url,
        server.max_request_bytes,
        server.max_batch,
    )
    if ready is not None:
        ready.set()
    try:
        server.serve_forever()
    finally:
        server.server_close()


# ---------------------------------------------------------------------------------------------
# request handling


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    timeout = 30  # seconds a client may stall on one read; the server's deadline bounds the rest
    _oversize = 0  # the Content-Length of a request refused with 413
    server_version = "ddpo-lite-reward"

    # one request per connection (HTTP/1.0): from accept to the last byte of the body, the
    # request must arrive within the server's request_deadline or is cut off with a 408
    def setup(self) -> None:
        super().setup()
        self._replied = False
        self._reply_lock = threading.Lock()
        self.server.watch(self, self.server.request_deadline)

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:  # the client went away, or was cut off: nothing to answer
            self.close_connection = True

    def finish(self) -> None:
        self.server.watch(self, None)
        try:
            super().finish()
        except OSError:
            pass

    def cut_off(self) -> None:
        """The deadline passed while the request was still arriving (the server's watcher
        thread calls this): answer 408 and close, so the handler's read ends."""
        with self._reply_lock:
            if self._replied:
                return
            self._replied = True
        seconds = self.server.request_deadline
        body = json.dumps({"error": f"the request did not arrive within {seconds:g}s"}).encode()
        head = (
            "HTTP/1.0 408 Request Timeout\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            self.connection.settimeout(1.0)
            self.connection.sendall(head.encode() + body)
        except OSError:
            pass
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        log.info(
            "%s cut off: the request did not arrive within %gs", self.client_address[0], seconds
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # any other method (PUT, DELETE, HEAD, FOO): 405, not 501
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        started = time.perf_counter()
        self.server.watch(self, None)
        path = self.path.split("?")[0]
        allow = {"/score": "POST", "/health": "GET"}.get(path, "GET, POST")
        message = f"{self.command} is not allowed here: use POST /score or GET /health"
        self._oversize = _content_length(self.headers)
        self._answer(405, {"error": message}, {"Allow": allow})
        self._discard_body()
        self._log(405, None, started, message)

    def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
        started = time.perf_counter()
        self.server.watch(self, None)
        path = self.path.split("?")[0]
        if path == "/health":
            status, payload = (
                200,
                {
                    "status": "ok",
                    "reward": self.server.reward_name,
                    "max_request_bytes": self.server.max_request_bytes,
                    "max_batch": self.server.max_batch,
                    "max_concurrent": self.server.max_concurrent,
                    "max_pixels": self.server.pixels.limit,
                },
            )
        elif path == "/score":
            self._not_allowed()
            return
        else:
            status, payload = 404, {"error": f"no {self.path}: use POST /score or GET /health"}
        self._answer(status, payload)
        self._log(status, None, started, payload.get("error", ""))

    def do_POST(self) -> None:  # noqa: N802
        started = time.perf_counter()
        left = self.server.watch(self, None)  # the headers are in; waiting for a slot is free
        if self.path.split("?")[0] != "/score":
            message = f"no {self.path}: use POST /score or GET /health"
            self._answer(404, {"error": message})
            self._log(404, None, started, message)
            return
        if not self.server.slots.acquire(timeout=QUEUE_SECONDS):
            message = f"busy: {self.server.max_concurrent} requests in progress; retry shortly"
            self._oversize = _content_length(self.headers)
            self._answer(503, {"error": message}, {"Retry-After": "1"})
            self._discard_body()
            self._log(503, None, started, message)
            return
        try:
            self._score(started, left)
        finally:
            self.server.slots.release()

    def _score(self, started: float, left: float) -> None:
        # 1. the request: size checked before reading, then parsed and decoded (no lock held),
        # its pixels counted against the server's budget until it is answered
        try:
            self.server.watch(self, left)
            body = self._read_body()
            self.server.watch(self, None)
            images, prompts, metadata, request_id = parse_request(body, self.server.pixels)
        except BadRequest as err:
            self.server.watch(self, None)
            retry = {"Retry-After": "1"} if err.status == 503 else None
            self._answer(err.status, {"error": str(err)}, retry)
            if err.status == 413:
                self._discard_body()
            self._log(err.status, None, started, str(err))
            return
        del body
        count, pixels = len(images), sum(image.width * image.height for image in images)
        try:
            status, payload = self._reward(images, prompts, metadata, request_id)
        finally:  # the pixels are given back before the answer: a client that has it may reuse them
            del images
            self.server.pixels.release(pixels)
        self._answer(status, payload)
        self._log(status, count, started, payload.get("error", ""))

    def _reward(self, images, prompts, metadata, request_id) -> tuple[int, dict]:
        # 2. the reward, chunk by chunk under the lock; its failure is a 500 the client may retry
        name = self.server.reward_name
        try:
            rewards, info = score_in_chunks(
                self.server.reward, images, prompts, metadata, self.server.max_batch,
                self.server.reward_lock,
            )  # fmt: skip
        except RewardOutputError as err:
            return 500, {"error": f"reward {name!r} {err}"}
        except Exception as err:
            message = f"reward {name!r} raised {type(err).__name__}: {err}"
            log.exception("%s", message)
            return 500, {"error": message}
        payload = {"rewards": to_jsonable(rewards), "info": to_jsonable(info)}
        if request_id is not None:
            payload["id"] = request_id
        return 200, payload

    # -- helpers -------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        """The body, its size checked against the limit before a byte of it is read."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise BadRequest("chunked requests are not supported; send Content-Length", 411)
        header = self.headers.get("Content-Length")
        if header is None:
            raise BadRequest("a Content-Length header is required", 411)
        try:
            size = int(header)
        except ValueError:
            raise BadRequest(f"Content-Length {header!r} is not a number") from None
        if size < 0:
            raise BadRequest(f"Content-Length {size} is negative")
        limit = self.server.max_request_bytes
        if size > limit:
            self._oversize = size
            raise BadRequest(
                f"request of {size} bytes is over this server's limit of {limit} bytes: send "
                "fewer images per request (RemoteReward batch_size) or raise --max-request-mb",
                413,
            )
        try:
            body = self.rfile.read(size)
        except OSError as err:  # includes the handler's timeout on a stalled client
            self.close_connection = True
            raise BadRequest(f"reading the body failed: {err}") from None
        if len(body) < size:
            self.close_connection = True
            raise BadRequest(f"the body ended after {len(body)} of {size} bytes")
        return body

    def _discard_body(self, seconds: float = 10.0) -> None:
        """Read and drop an oversized body (after answering 413), so that the client gets to
        read our answer instead of a connection reset; bounded in time, nothing is kept."""
        self.close_connection = True
        deadline = time.monotonic() + seconds
        remaining = self._oversize
        try:
            self.connection.settimeout(1.0)
            while remaining > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(remaining, 1 << 16))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:
            pass

    def _answer(self, status: int, payload: dict, headers: dict | None = None) -> None:
        with self._reply_lock:  # once: the deadline watcher may have answered 408 already
            if self._replied:
                return
            self._replied = True
        body = json.dumps(payload, allow_nan=False).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if status >= 400:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client went away; nothing to do
            self.close_connection = True

    def _log(self, status: int, n: int | None, started: float, error: str = "") -> None:
        """The one log line of a request: client, method, path, status, images, seconds."""
        seconds = time.perf_counter() - started
        line = f"{self.client_address[0]} {self.command} {self.path} {status}"
        line += f" {n} images" if n is not None else ""
        line += f" {seconds:.3f}s"
        if error:
            line += f" ({error})"
        log.info("%s", line)

    def log_request(self, code="-", size="-") -> None:
        pass  # the one line per request comes from _log, with the image count and time

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.warning("%s %s", self.address_string(), format % args)


def _content_length(headers) -> int:
    try:
        return max(int(headers.get("Content-Length") or 0), 0)
    except ValueError:
        return 0


def parse_request(
    body: bytes, budget: PixelBudget | None = None
) -> tuple[list[Image.Image], list[str], list[dict], str | None]:
    """A /score body as (images, prompts, metadata, id or None); BadRequest says what is wrong.
    With a `budget`, the images' pixels are reserved in it before they are decoded."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"the body is not valid JSON: {err}") from None
    except RecursionError:
        raise BadRequest("the body's JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the body must be a JSON object with fields {', '.join(_FIELDS)}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; the fields are {', '.join(_FIELDS)}")
    for field in ("images", "prompts"):
        if field not in data:
            raise BadRequest(f"missing field {field!r}")
    images, prompts = data["images"], data["prompts"]
    request_id = data.get("id")
    if request_id is not None and not (
        isinstance(request_id, str) and len(request_id) <= MAX_ID_CHARS
    ):
        raise BadRequest(f"'id' must be a string of at most {MAX_ID_CHARS} characters")
    metadata = data.get("metadata")
    if metadata is None:
        metadata = [{} for _ in images] if isinstance(images, list) else None
    for field, value, kind in (
        ("images", images, str),
        ("prompts", prompts, str),
        ("metadata", metadata, dict),
    ):
        if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
            want = "base64 PNG strings" if field == "images" else f"{kind.__name__}s"
            raise BadRequest(f"{field!r} must be a list of {want}")
    if not len(images) == len(prompts) == len(metadata):
        raise BadRequest(
            f"{len(images)} images, {len(prompts)} prompts and {len(metadata)} metadata entries: "
            "they must be one per sample"
        )
    return decode_images(images, budget), prompts, metadata, request_id


def decode_images(encoded: Sequence[str], budget: PixelBudget | None = None) -> list[Image.Image]:
    """base64 PNG strings as loaded PIL images; headers (format, size) are all checked before
    any pixels are decoded, so a request cannot make the server allocate without bound; with a
    `budget`, their pixels are reserved in it first (released here if decoding fails)."""
    opened = []
    total = 0
    for i, text in enumerate(encoded):
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:
            raise BadRequest(f"image {i} is not valid base64: {err}") from None
        try:
            image = Image.open(io.BytesIO(raw))
        except Exception as err:
            raise BadRequest(f"image {i} is not a readable image: {err}") from None
        if image.format != "PNG":
            raise BadRequest(f"image {i} is {image.format}, not PNG")
        pixels = image.width * image.height
        if pixels > MAX_IMAGE_PIXELS:
            raise BadRequest(
                f"image {i} is {image.width}x{image.height}, over {MAX_IMAGE_PIXELS} pixels"
            )
        total += pixels
        if total > MAX_REQUEST_PIXELS:
            raise BadRequest(f"the images add up to over {MAX_REQUEST_PIXELS} pixels")
        opened.append(image)
    if budget is not None:
        budget.reserve(total)
    for i, image in enumerate(opened):
        try:
            image.load()
        except Exception as err:
            if budget is not None:
                budget.release(total)
            raise BadRequest(f"image {i} is not a decodable PNG: {err}") from None
    return opened


def score_in_chunks(
    reward: Callable,
    images: list[Image.Image],
    prompts: list[str],
    metadata: list[dict],
    max_batch: int,
    lock: threading.Lock,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Call `reward` on chunks of at most `max_batch` samples, in order; check each answer."""
    rewards, infos, sizes = [], [], []
    for start in range(0, len(images), max_batch):
        stop = start + max_batch
        with lock:
            chunk_rewards, chunk_info = reward(
                images[start:stop], prompts[start:stop], metadata[start:stop]
            )
        n = len(images[start:stop])
        try:
            chunk_rewards = as_reward_values(chunk_rewards)
        except (TypeError, ValueError, RuntimeError) as err:
            raise RewardOutputError(f"returned non-numeric rewards: {err}") from None
        if chunk_rewards.shape != (n,):
            raise RewardOutputError(
                f"returned rewards of shape {chunk_rewards.shape} for {n} images"
            )
        if not isinstance(chunk_info, dict):
            raise RewardOutputError(
                f"returned info of type {type(chunk_info).__name__}, not a dict"
            )
        rewards.append(chunk_rewards)
        infos.append(chunk_info)
        sizes.append(n)
    if not rewards:
        return np.zeros(0, dtype=np.float64), {}
    return np.concatenate(rewards), merge_infos(infos, sizes)


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpo-lite serve-reward",
        description="Serve a registered reward over HTTP (JSON, base64 PNG images; no pickle).",
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve-reward arguments, for this module's main() and the ddpo-lite CLI."""
    parser.add_argument("name", help="a registered reward (see `ddpo-lite rewards`)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"0 picks a free port (default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--max-request-mb",
        type=float,
        default=DEFAULT_MAX_REQUEST_BYTES / 2**20,
        help="largest request body in MiB (default %(default)g)",
    )
    parser.add_argument(
        "--max-batch", type=int, default=None, help="images per reward call (default: the reward's)"
    )
    parser.add_argument("--device", default=None, help="device for a model reward, e.g. cuda:1")
    parser.add_argument("--model", default=None, help="hub id or local path replacing the default")


def run_from_args(args: argparse.Namespace) -> int:
    """Serve as `args` say; one line on stderr and exit status 2 for a user's mistake."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if not 0 <= args.port <= 65535:  # checked before a reward model loads
        print(
            f"error: --port {args.port} is invalid: give 1-65535, or 0 for a free port",
            file=sys.stderr,
        )
        return 2
    if args.max_request_mb <= 0 or (args.max_batch is not None and args.max_batch < 1):
        print("error: --max-request-mb must be > 0 and --max-batch >= 1", file=sys.stderr)
        return 2
    options = {k: v for k, v in (("device", args.device), ("model", args.model)) if v is not None}
    try:
        reward = get_reward(args.name, **options)
    except (UnknownRewardError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        serve(
            reward,
            args.host,
            args.port,
            max_request_bytes=int(args.max_request_mb * 2**20),
            max_batch=args.max_batch,
            name=args.name,
        )
    except (OSError, OverflowError) as err:  # OverflowError: socket's own port range check
        print(
            f"error: cannot listen on {args.host}:{args.port}: {getattr(err, 'strerror', None) or err}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("reward server stopped", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
