"""The thread a run's reward is called in: every wait on it is bounded, and Ctrl-C always stops.

Why not `concurrent.futures.ThreadPoolExecutor`: its worker threads are joined when the
interpreter exits, and `shutdown(wait=True)` waits for the running call, so a reward that never
returns would keep the process alive forever after the run had stopped. This worker's thread is
a daemon, and `shutdown()` never waits for the call in flight: a hung reward is left behind and
the process still exits.

    worker = RewardWorker()
    future = worker.submit(reward, images, prompts, metadata)   # a concurrent.futures.Future
    rewards, info = future.result(timeout=600)
    worker.shutdown()
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class RewardWorker:
    """One daemon thread running submitted calls in order; `submit` returns a Future."""

    def __init__(self, name: str = "ddpo-lite-reward"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._futures: list[Future] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future:
        future: Future = Future()
        self._futures = [f for f in self._futures if not f.done()]
        self._futures.append(future)
        self._jobs.put((future, fn, args))
        return future

    def shutdown(self, cancel_futures: bool = True) -> None:
        """Cancel the calls not started yet and let the thread end after the one in flight,
        without waiting for it (a hung reward is left to the daemon thread)."""
        if cancel_futures:
            for future in self._futures:
                future.cancel()  # False for the running one: it is left to finish or hang
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue  # cancelled before it started
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # noqa: BLE001 - KeyboardInterrupt too: the caller decides
                future.set_exception(err)
