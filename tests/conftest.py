"""Shared fixtures: every test runs offline on the tiny model, cached once per session."""

import os

import pytest

from ddpo_lite.config import load_config


@pytest.fixture(scope="session", autouse=True)
def _offline_cache(tmp_path_factory):
    """Keep the tiny model's cache inside the test session and forbid the hub."""
    os.environ.setdefault("DDPO_LITE_CACHE", str(tmp_path_factory.mktemp("ddpo-lite-cache")))
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield


def tiny_config(tmp_path, *overrides: str):
    """The tiny preset, writing into tmp_path, with `key=value` overrides."""
    return load_config("tiny", [f'output_dir="{tmp_path / "run"}"', *overrides])
