"""Shared fixtures: every test runs offline on the tiny model, cached once per session."""

import functools
import os
import time

import pytest
import torch

from ddpo_lite.config import load_config

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (README's test command): two workers on two cores, one torch thread each
    # (two processes of two threads each would spin-wait for each other's cores); subprocesses
    # the tests start (CLI runs, torchrun) inherit one thread too
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _offline_cache(tmp_path_factory):
    """Keep the tiny model's cache inside the test session and forbid the hub."""
    os.environ.setdefault("DDPO_LITE_CACHE", str(tmp_path_factory.mktemp("ddpo-lite-cache")))
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield


def tiny_config(tmp_path, *overrides: str):
    """The tiny preset, writing into tmp_path, with `key=value` overrides."""
    return load_config("tiny", [f'output_dir="{tmp_path / "run"}"', *overrides])


@functools.cache
def half_precision_is_emulated() -> bool:
    """True on a CPU without half-precision kernels (AVX2, no AVX-512 / AMX), where torch runs
    bf16 and fp16 matmuls and convolutions in reference loops: measured 30-50x slower than
    float32 there (bf16 autocast made the suite twice as long on such a machine)."""

    def seconds(dtype: torch.dtype) -> float:
        a, b = torch.randn(512, 128, dtype=dtype), torch.randn(128, 128, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        return time.perf_counter() - start

    return seconds(torch.bfloat16) > 5 * seconds(torch.float32)
