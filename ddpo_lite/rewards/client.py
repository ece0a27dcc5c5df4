"""The reward server's client: a reward callable that scores a batch on a remote server.

Why: a big reward model (LLaVA, an aesthetic CLIP) can live on another GPU or machine and be
shared; the trainer calls it like any local reward. The server is `ddpo_lite.rewards.server`
(`ddpo-lite serve-reward NAME --port P`).

Wire protocol (JSON over HTTP; images as base64 PNG, never pickle):

    POST {url}/score   {"images": [b64 PNG, ...], "prompts": [str, ...], "metadata": [{...}, ...],
                        "id": str}
                    -> {"rewards": [float | null, ...], "info": {name: [value, ...] | value},
                        "id": the request's id}
    GET  {url}/health -> {"status": "ok", "reward": name, ...}

    Non-finite floats travel as JSON null (strict JSON has no NaN) and come back as NaN, so the
    trainer's "drop non-finite rewards with a warning" still sees them. Errors answer 4xx/5xx with
    {"error": message}.

How to use:

    reward = RemoteReward("http://127.0.0.1:8123", timeout=60, retries=3, backoff=1.0)
    rewards, info = reward(images, prompts, metadata)   # rewards: np.ndarray (B,), float64

Failure policy: connection errors, timeouts, 5xx answers and 429 (Too Many Requests) are retried
`retries` times with exponential backoff (backoff, 2*backoff, 4*backoff, ... seconds between
attempts), all within one `timeout` budget per call (one batch: every request, retry and backoff
of it), so a stalled server stops the run within `timeout` seconds, not attempts x timeout. A 429
or 503 with a `Retry-After` header (seconds or an HTTP-date) waits the larger of it and the
backoff; a server asking for longer than the budget has left fails at once (a malformed header
is ignored: the backoff). Any other 4xx answer (our request was wrong), a redirect (never
followed: a 302 would turn the POST into a GET without images) or an answer that is not exactly
what was asked (rewards that are not JSON numbers or null, another length, another request's
id) raises at once. Either way the error is a `RewardServerError` whose one-line message names
the server and what happened.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from time import sleep
from typing import Any

import numpy as np
from PIL import Image


class RewardServerError(RuntimeError):
    """The reward server did not answer, refused our request, or answered something unusable."""


class _Retryable(Exception):
    """One attempt failed in a way a retry may fix (connection, timeout, 5xx, 429); `wait` is
    the server's Retry-After in seconds, None when it sent none (or none that parses)."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


RETRY_AFTER_STATUSES = (429, 503)  # the answers whose Retry-After header the client honours


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx answer stays an HTTPError: urllib would follow it, a POST becoming a GET."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_opener = urllib.request.build_opener(_NoRedirects)


# ---------------------------------------------------------------------------------------------
# the wire format, shared with server.py


def encode_image(image: Image.Image) -> str:
    """A PIL image as base64 PNG text (lossless: the server sees exactly these pixels)."""
    buffer = io.BytesIO()
    try:
        # compress_level 1: PNG is lossless at every level; 1 is several times faster than 6
        image.save(buffer, format="PNG", compress_level=1)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot encode a {image.mode} image as PNG: {err}") from err
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def to_jsonable(value: Any) -> Any:
    """`value` as plain JSON types: numpy/torch arrays and scalars to lists and numbers,
    non-finite floats to None (strict JSON has no NaN/inf). Raises TypeError otherwise."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # np.ndarray, torch.Tensor
        if hasattr(value, "detach"):
            value = value.detach().cpu()
        return to_jsonable(value.tolist())
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def from_json_numbers(values: list) -> np.ndarray | list:
    """A JSON list of numbers and nulls as a float64 array (null -> NaN); other lists as they are."""
    if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
        return np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    return values


# ---------------------------------------------------------------------------------------------
# the client


class RemoteReward:
    """A reward `(images, prompts, metadata) -> (rewards (B,), info)` served over HTTP.

    Args:
        url: the server's base URL, e.g. "http://127.0.0.1:8123".
        timeout: seconds one call may take in all: every request, retry and backoff sleep
            of one batch (connect + scoring + answer).
        retries: extra attempts after a connection error, timeout, 5xx or 429 answer (a
            Retry-After header on a 429 or 503 can lengthen the wait before one).
        backoff: seconds before the first retry; doubled before each next one.
        batch_size: at most this many images per request (a big batch is sent in order as
            several requests), keeping each request under the server's size limit.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        batch_size: int = 16,
    ):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"reward server URL {url!r} must look like http://HOST:PORT")
        if timeout <= 0 or retries < 0 or backoff < 0 or batch_size < 1:
            raise ValueError(
                f"RemoteReward needs timeout > 0, retries >= 0, backoff >= 0, batch_size >= 1; "
                f"got timeout={timeout}, retries={retries}, backoff={backoff}, "
                f"batch_size={batch_size}"
            )
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.batch_size = int(batch_size)

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r})"

    def __call__(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        metadata: Sequence[dict] | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        metadata = [{} for _ in images] if metadata is None else list(metadata)
        if not len(images) == len(prompts) == len(metadata):
            raise ValueError(
                f"{len(images)} images, {len(prompts)} prompts and {len(metadata)} metadata "
                "entries: they must be one per sample"
            )
        rewards: list[np.ndarray] = []
        infos: list[dict[str, Any]] = []
        deadline = time.monotonic() + self.timeout  # one budget for the whole batch
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            chunk_rewards, chunk_info = self._score(
                images[start:stop], prompts[start:stop], metadata[start:stop], deadline
            )
            rewards.append(chunk_rewards)
            infos.append(chunk_info)
        if not rewards:
            return np.zeros(0, dtype=np.float64), {}
        return np.concatenate(rewards), merge_infos(infos, [len(r) for r in rewards])

    def health(self) -> dict[str, Any]:
        """The server's GET /health answer, with the same retries as scoring."""
        answer = self._request("GET", "/health", None, time.monotonic() + self.timeout)
        if not isinstance(answer, dict) or answer.get("status") != "ok":
            raise RewardServerError(f"reward server {self.url} is not healthy: {answer!r}")
        return answer

    # -- one request ---------------------------------------------------------------------------

    def _score(
        self, images, prompts, metadata, deadline: float
    ) -> tuple[np.ndarray, dict[str, Any]]:
        request_id = uuid.uuid4().hex
        body = {
            "images": [encode_image(image) for image in images],
            "prompts": [str(p) for p in prompts],
            "metadata": [to_jsonable(dict(m)) for m in metadata],
            "id": request_id,
        }
        payload = json.dumps(body, allow_nan=False).encode()
        answer = self._request("POST", "/score", payload, deadline)
        if not isinstance(answer, dict):
            raise RewardServerError(
                f"reward server {self.url} answered {str(answer)[:200]!r}, not a JSON object"
            )
        if answer.get("id") != request_id:
            raise RewardServerError(
                f"reward server {self.url} answered with request id {answer.get('id')!r}, not "
                f"{request_id!r}: an answer to another request (a proxy or cache in between?)"
            )
        raw = answer.get("rewards")
        if not isinstance(raw, list) or len(raw) != len(images):
            got = f"{len(raw)} rewards" if isinstance(raw, list) else f"{str(answer)[:200]!r}"
            raise RewardServerError(
                f"reward server {self.url} answered {got} for {len(images)} images"
            )
        wrong = [r for r in raw if not _is_number_or_null(r)]
        if wrong:
            raise RewardServerError(
                f"reward server {self.url} answered {len(wrong)} reward(s) that are not JSON "
                f"numbers, such as {wrong[0]!r} ({type(wrong[0]).__name__})"
            )
        rewards = np.array([math.nan if r is None else float(r) for r in raw], np.float64)
        info = answer.get("info") or {}
        if not isinstance(info, dict):
            raise RewardServerError(f"reward server {self.url} answered info that is not a dict")
        info = {
            k: from_json_numbers(v) if isinstance(v, list) and len(v) == len(images) else v
            for k, v in info.items()
        }
        return rewards, info

    def _request(self, method: str, path: str, body: bytes | None, deadline: float) -> Any:
        """One request with retries, all before `deadline` (time.monotonic()); the decoded
        JSON answer."""
        attempts, made, out_of_time = self.retries + 1, 0, False
        reason, asked = "no time left", None
        for attempt in range(attempts):
            if attempt:
                pause = self.backoff * 2 ** (attempt - 1)
                if asked is not None:
                    self._check_retry_after(asked, reason, deadline)
                    pause = max(pause, asked)
                if time.monotonic() + pause >= deadline:
                    out_of_time = True
                    break
                sleep(pause)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                out_of_time = True
                break
            made += 1
            try:
                return self._attempt(method, path, body, remaining, deadline)
            except _Retryable as err:
                reason, asked = str(err), err.wait
        verb = "failed" if reason.startswith("HTTP") else "did not answer"
        tries = f"{made} attempt{'s' if made != 1 else ''}"
        if out_of_time:
            raise RewardServerError(
                f"reward server {self.url} {verb} within reward.timeout = {self.timeout:g}s "
                f"for the batch ({tries}; {reason})"
            )
        raise RewardServerError(f"reward server {self.url} {verb} after {tries} ({reason})")

    def _check_retry_after(self, asked: float, reason: str, deadline: float) -> None:
        """Fail at once when the server's Retry-After is past what the batch's budget has left."""
        left = deadline - time.monotonic()
        if asked < left:
            return
        spent = self.timeout - left
        raise RewardServerError(
            f"reward server {self.url} asked to wait {round(asked, 1):g}s (Retry-After) but the "
            f"batch has {max(left, 0):.1f}s left of reward.timeout = {self.timeout:g}s: raise "
            f"reward.timeout above {math.ceil(spent + asked):d}s ({reason})"
        )

    def _attempt(
        self, method: str, path: str, body: bytes | None, timeout: float, deadline: float
    ) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=body,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with _opener.open(request, timeout=timeout) as response:
                payload = _read_before(response, deadline)
        except urllib.error.HTTPError as err:
            if 300 <= err.code < 400:
                where = err.headers.get("Location", "") if err.headers else ""
                raise RewardServerError(
                    f"reward server {self.url} answered a redirect (HTTP {err.code}"
                    f"{f' to {where}' if where else ''}), which ddpo-lite does not follow: set "
                    "reward.url to the server's own address"
                ) from err
            message = _error_message(err)
            if err.code >= 500 or err.code == 429:
                wait = None
                if err.code in RETRY_AFTER_STATUSES and err.headers:
                    wait = parse_retry_after(err.headers.get("Retry-After"))
                raise _Retryable(f"HTTP {err.code}: {message}", wait) from err
            raise RewardServerError(
                f"reward server {self.url} refused the request (HTTP {err.code}: {message})"
            ) from err
        except urllib.error.URLError as err:  # while connecting or sending
            raise _Retryable(self._describe(err.reason, timeout)) from err
        except OSError as err:  # while waiting for or reading the answer: timeout, reset, ...
            raise _Retryable(self._describe(err, timeout)) from err
        except http.client.HTTPException as err:  # a half-written answer (server died mid-way)
            raise _Retryable(f"broken answer: {type(err).__name__}: {err}") from err
        try:
            return json.loads(payload)
        except ValueError as err:
            raise RewardServerError(
                f"reward server {self.url} answered something that is not JSON: {payload[:100]!r}"
            ) from err

    def _describe(self, reason: object, timeout: float) -> str:
        """A short phrase for a socket-level failure: 'connection refused', 'timed out', ..."""
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused"
        if isinstance(reason, ConnectionResetError):  # includes http.client.RemoteDisconnected
            return "connection reset"
        if isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError
            return f"timed out after {round(timeout, 2):g}s"
        if isinstance(reason, socket.gaierror):
            return f"unknown host: {reason}"
        if isinstance(reason, BaseException):
            return f"{type(reason).__name__}: {reason}"
        return str(reason)


def _read_before(response, deadline: float) -> bytes:
    """The answer's body, read in pieces, each read bounded by the socket timeout; a server
    that drips its answer past `deadline` is cut off (TimeoutError, as a socket timeout)."""
    parts = []
    while chunk := response.read(1 << 16):
        parts.append(chunk)
        if time.monotonic() > deadline:
            raise TimeoutError("the answer was still arriving at the deadline")
    body = b"".join(parts)
    expected = response.headers.get("Content-Length")
    if expected is not None and expected.isdigit() and len(body) < int(expected):
        # read(n) ends quietly where read() raises: the server went away mid-answer
        raise http.client.IncompleteRead(body, int(expected) - len(body))
    return body


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """A Retry-After header as seconds to wait from `now` (UTC): delay-seconds (an integer) or
    an HTTP-date (a past date is 0); None when absent or malformed."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, as HTTP-dates are
        when = when.replace(tzinfo=UTC)
    now = datetime.now(UTC) if now is None else now
    return max((when - now).total_seconds(), 0.0)


def _is_number_or_null(value: Any) -> bool:
    """A JSON number (not a boolean: json gives True for `true`) or null."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _error_message(err: urllib.error.HTTPError) -> str:
    """The server's {"error": ...} message, or the HTTP reason."""
    try:
        detail = json.loads(err.read())["error"]
        return str(detail)
    except Exception:
        return str(err.reason)


def merge_infos(infos: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """Join per-chunk info dicts into one for the whole batch.

    A per-sample value (a list or array as long as its chunk) is concatenated; a scalar that is
    the same in every chunk stays a scalar; a scalar that differs between chunks becomes a
    per-sample list (each sample gets its chunk's value). A key missing in some chunk is
    filled with None for that chunk's samples.
    """
    if len(infos) == 1:
        return infos[0]
    keys = list(dict.fromkeys(k for info in infos for k in info))
    merged: dict[str, Any] = {}
    for key in keys:
        values = [info.get(key) for info in infos]
        per_sample = [
            isinstance(v, (list, np.ndarray)) and len(v) == n
            for v, n in zip(values, sizes, strict=True)
        ]
        if not any(per_sample) and all(key in info for info in infos):
            if all(_same(v, values[0]) for v in values):
                merged[key] = values[0]
                continue
        if all(isinstance(v, np.ndarray) for v in values) and all(per_sample):
            merged[key] = np.concatenate(values)
            continue
        parts = [
            list(v) if is_list else [v] * n
            for v, n, is_list in zip(values, sizes, per_sample, strict=True)
        ]
        merged[key] = [x for part in parts for x in part]
    return merged


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) or (a != a and b != b)  # NaN == NaN here
    except Exception:
        return False
