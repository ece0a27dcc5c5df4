"""scripts/check_floors.py: the floors it installs are the `>=` bounds pyproject.toml declares."""

import importlib.util
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location(
        "check_floors", ROOT / "scripts" / "check_floors.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_declared_floor_is_pinned_and_torch_is_cis():
    pins = _script().floor_pins(["torch>=2.5,<3", "diffusers>=0.37,<1", "pillow>=10.1", "rich"])
    assert pins == ["diffusers==0.37", "pillow==10.1", "rich"]
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = _script().floor_pins(declared)
    assert len(pinned) == len(declared) - 1 and all("==" in pin for pin in pinned)
