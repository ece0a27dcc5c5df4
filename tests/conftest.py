"""Shared fixtures: every test runs offline on the tiny model, cached once per session."""

import os

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
