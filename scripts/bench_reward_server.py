"""Load figures for the reward server: requests/s, latency p50/p99, the server's peak RSS.

The server (`python -m ddpo_lite.rewards.server jpeg_compressibility`) runs as its own process,
so its peak resident set (VmHWM, Linux) is its own; clients are threads here, over loopback.
Two phases: a burst of CLIENTS simultaneous connections (each one request: all answered, none
reset?), then a sustained phase (CLIENTS threads, REQUESTS each). A third phase sends one
request of 16 images of 4096x4096 (the per-server pixel budget's worth) to see the peak RSS.

    python scripts/bench_reward_server.py [--clients 100] [--requests 5] [--images 2] [--big]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _png(size: int, seed: int | None) -> str:
    """Noise (seed), or a flat image (None: a few kB of PNG however large)."""
    if seed is None:
        pixels = np.full((size, size, 3), 128, dtype=np.uint8)
    else:
        pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode()


def _post(host: str, port: int, body: bytes) -> tuple[int | str, float]:
    started = time.perf_counter()
    try:
        conn = http.client.HTTPConnection(host, port, timeout=120)
        conn.request("POST", "/score", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        conn.close()
        return response.status, time.perf_counter() - started
    except Exception as err:  # noqa: BLE001 - counted as an error
        return type(err).__name__, time.perf_counter() - started


def _peak_rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) * 1024


def _phase(host, port, body, clients: int, requests: int) -> dict:
    results: list[tuple] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client():
        barrier.wait()
        for _ in range(requests):
            outcome = _post(host, port, body)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    latencies = np.array([t for _, t in results])
    statuses: dict = {}
    for status, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    return {
        "requests": len(results),
        "statuses": statuses,
        "requests_per_s": len(results) / seconds,
        "p50_ms": float(np.percentile(latencies, 50) * 1000),
        "p99_ms": float(np.percentile(latencies, 99) * 1000),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--images", type=int, default=2, help="64x64 images per request")
    parser.add_argument("--big", action="store_true", help="also 16 x 4096x4096 in one request")
    args = parser.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    command = [sys.executable, "-m", "ddpo_lite.rewards.server", "jpeg_compressibility"]
    server = subprocess.Popen([*command, "--port", "0"], env=env, stdout=log, stderr=log)
    try:
        for _ in range(600):
            match = re.search(r"http://([\d.]+):(\d+)", Path(log.name).read_text())
            if match:
                break
            time.sleep(0.05)
        host, port = match.group(1), int(match.group(2))
        images = [_png(64, i) for i in range(args.images)]
        body = json.dumps({"images": images, "prompts": ["a"] * len(images)}).encode()
        figures = {
            "burst": _phase(host, port, body, args.clients, 1),
            "sustained": _phase(host, port, body, args.clients, args.requests),
            "peak_rss_mb_small": _peak_rss(server.pid) / 2**20,
        }
        if args.big:
            big = [_png(4096, None)] * 16  # flat: a small body, 2**28 pixels to decode
            body = json.dumps({"images": big, "prompts": ["a"] * 16}).encode()
            figures["big"] = {"request_mb": len(body) / 2**20, **_phase(host, port, body, 1, 1)}
            figures["peak_rss_mb_big"] = _peak_rss(server.pid) / 2**20
        print(json.dumps(figures, indent=2))
    finally:
        server.terminate()
        server.wait(10)
        Path(log.name).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
