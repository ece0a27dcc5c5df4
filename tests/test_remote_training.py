"""Training through a reward server, for real: the server is a separate process on 127.0.0.1;
killed mid-run, the run stops with one line naming the server and its last checkpoint intact,
and resumes against a new server to the end."""

import json
import os
import re
import subprocess
import sys
import threading
import time

from ddpo_lite.checkpoint import latest_checkpoint, list_checkpoints
from ddpo_lite.cli import main


def _start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpo_lite.cli", "serve-reward", "jpeg_compressibility"]
        + ["--port", "0"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        found = re.search(r"(http://127\.0\.0\.1:\d+)", line or "")
        if found:
            # keep draining its log so the server never blocks on a full pipe
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, found.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("the reward server did not start")


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_through_the_server_kill_it_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    server, url = _start_server()
    sets = [
        "num_epochs=5",
        "sample.num_steps=3",
        "sample.num_batches_per_epoch=2",
        f"reward.url='{url}'",
        "reward.retries=2",
        "reward.backoff=0.05",
        "reward.timeout=10",
        "log_with=[]",
    ]
    argv = ["train", "--preset", "tiny", "--output", str(out), "--quiet"]
    for item in sets:
        argv += ["--set", item]

    def kill_after_two_epochs():
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        server.kill()

    killer = threading.Thread(target=kill_after_two_epochs)
    killer.start()
    try:
        code = main(argv)
    finally:
        killer.join()
        server.kill()
        server.wait()
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert url in err and "did not answer" in err and "--resume" in err
    done = len(_rows(out))
    assert 2 <= done < 5
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and int(checkpoint.name.split("_")[1]) == done
    assert all((c / "state.json").is_file() for c in list_checkpoints(out))

    # a new server (another port): resume there and finish
    server, url = _start_server()
    try:
        argv = ["train", "--resume", str(out), "--quiet", "--set", f"reward.url='{url}'"]
        assert main(argv) == 0
    finally:
        server.kill()
        server.wait()
    assert [row["epoch"] for row in _rows(out)] == [1, 2, 3, 4, 5]
