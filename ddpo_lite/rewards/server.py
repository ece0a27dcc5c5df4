"""The reward server: any registered reward (or your own callable) served over HTTP.

Why: a big reward model can live on another GPU or machine than the trainer, and several runs
can share it. The protocol is JSON with base64 PNG images; nothing is ever unpickled, so a
request can only ever be data (the DDPO paper's LLaVA server unpickles its requests: not ours).

    POST /score   {"images": [b64 PNG, ...], "prompts": [str, ...], "metadata": [{...}, ...],
                   "id": str}
               -> 200 {"rewards": [float | null, ...], "info": {name: [per-sample] | scalar},
                       "id": the request's id}
    GET  /health -> 200 {"status": "ok", "reward": NAME, "max_request_bytes": N, "max_batch": M}

`metadata` may be left out (one empty dict per image), and `id` (a string of at most 200
characters, echoed back so that the client can tell its answer); any other field is an error. Non-finite
floats are sent as null (strict JSON has no NaN); `RemoteReward` reads them back as NaN.
Errors answer {"error": message}: 400 a malformed request (bad JSON, wrong or missing fields,
lengths that disagree, an image that is not a decodable PNG or is too large), 411 no
Content-Length, 413 a body over `max_request_bytes` (checked before reading it), 404/405 wrong
path or method, 500 the reward raised or returned the wrong shape. The server keeps serving
after every error.

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
_FIELDS = ("images", "prompts", "metadata", "id")
MAX_ID_CHARS = 200


class BadRequest(ValueError):
    """The request is malformed; answered with `status` and the message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class RewardOutputError(ValueError):
    """The reward returned the wrong shape or type; answered 500 naming the reward."""


class RewardServer(ThreadingHTTPServer):
    """A threading HTTP server holding one reward, its name, limits and the lock around it."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        reward: Reward,
        name: str,
        max_request_bytes: int,
        max_batch: int,
    ):
        self.reward = reward
        self.reward_name = name
        self.max_request_bytes = max_request_bytes
        self.max_batch = max_batch
        self.reward_lock = threading.Lock()
        super().__init__(address, _Handler)

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
    if max_request_bytes < 1 or max_batch < 1:
        raise ValueError(
            f"max_request_bytes ({max_request_bytes}) and max_batch ({max_batch}) must be >= 1"
        )
    return RewardServer((host, port), reward, name, int(max_request_bytes), int(max_batch))


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
    timeout = 30  # seconds a client may stall while sending; frees the thread otherwise
    _oversize = 0  # the Content-Length of a request refused with 413
    server_version = "ddpo-lite-reward"

    def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
        started = time.perf_counter()
        path = self.path.split("?")[0]
        if path == "/health":
            status, payload = (
                200,
                {
                    "status": "ok",
                    "reward": self.server.reward_name,
                    "max_request_bytes": self.server.max_request_bytes,
                    "max_batch": self.server.max_batch,
                },
            )
        elif path == "/score":
            status, payload = 405, {"error": "use POST /score"}
        else:
            status, payload = 404, {"error": f"no {self.path}: use POST /score or GET /health"}
        self._answer(status, payload)
        self._log(status, None, started, payload.get("error", ""))

    def do_POST(self) -> None:  # noqa: N802
        started = time.perf_counter()
        if self.path.split("?")[0] != "/score":
            message = f"no {self.path}: use POST /score or GET /health"
            self._answer(404, {"error": message})
            self._log(404, None, started, message)
            return
        # 1. the request: size checked before reading, then parsed and decoded (no lock held)
        try:
            images, prompts, metadata, request_id = parse_request(self._read_body())
        except BadRequest as err:
            self._answer(err.status, {"error": str(err)})
            if err.status == 413:
                self._discard_body()
            self._log(err.status, None, started, str(err))
            return
        # 2. the reward, chunk by chunk under the lock; its failure is a 500 the client may retry
        name = self.server.reward_name
        try:
            rewards, info = score_in_chunks(
                self.server.reward, images, prompts, metadata, self.server.max_batch,
                self.server.reward_lock,
            )  # fmt: skip
            payload = {"rewards": to_jsonable(rewards), "info": to_jsonable(info)}
            if request_id is not None:
                payload["id"] = request_id
        except RewardOutputError as err:
            message = f"reward {name!r} {err}"
            self._answer(500, {"error": message})
            self._log(500, len(images), started, message)
            return
        except Exception as err:
            message = f"reward {name!r} raised {type(err).__name__}: {err}"
            log.exception("%s", message)
            self._answer(500, {"error": message})
            self._log(500, len(images), started, message)
            return
        self._answer(200, payload)
        self._log(200, len(images), started)

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

    def _answer(self, status: int, payload: dict) -> None:
        body = json.dumps(payload, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status >= 400:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the client went away; nothing to do
            pass

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


def parse_request(body: bytes) -> tuple[list[Image.Image], list[str], list[dict], str | None]:
    """A /score body as (images, prompts, metadata, id or None); BadRequest says what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"the body is not valid JSON: {err}") from None
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
    return decode_images(images), prompts, metadata, request_id


def decode_images(encoded: Sequence[str]) -> list[Image.Image]:
    """base64 PNG strings as loaded PIL images; headers (format, size) are all checked before
    any pixels are decoded, so a request cannot make the server allocate without bound."""
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
    for i, image in enumerate(opened):
        try:
            image.load()
        except Exception as err:
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
