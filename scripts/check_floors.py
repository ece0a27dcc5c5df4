"""Run the test suite with every dependency at the lowest version pyproject.toml declares.

The floors in `[project] dependencies` are a promise to users with older environments; this
script keeps them honest. It makes a fresh virtual environment, installs each dependency at its
`>=` bound (`name==floor`), torch at CI's version (older CPU builds are not installable offline),
the test extra at its newest, and ddpo-lite itself without dependencies, then runs the README's
test command there. Not part of CI (a second full suite, ~15 minutes on 2 cores); run it when a
floor or a dependency's use changes:

    python scripts/check_floors.py [--venv /tmp/floors] [-- pytest arguments]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: torch as CI installs it (a CPU build served from disk); the declared floor cannot be fetched.
TORCH = "torch==2.13.0"


def floor_pins(dependencies: list[str]) -> list[str]:
    """`name==floor` for each `name>=floor...` requirement; the others as written."""
    pins = []
    for requirement in dependencies:
        match = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", requirement)
        if match is None:
            pins.append(requirement)
        elif match.group(1) != "torch":
            pins.append(f"{match.group(1)}=={match.group(2)}")
    return pins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default="/tmp/ddpo-lite-floors", help="where to build it")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = floor_pins(project["dependencies"])
    venv = Path(args.venv)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")

    def pip(*items: str) -> None:
        subprocess.run([python, "-m", "pip", "install", "-q", *items], check=True)

    pip(TORCH)
    pip(*pins, *project["optional-dependencies"]["test"])
    pip("--no-deps", "-e", str(ROOT))
    listed = subprocess.run([python, "-m", "pip", "list"], capture_output=True, text=True)
    print("floors:", " ".join(pins))
    print(listed.stdout)
    command = [python, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider"]
    return subprocess.run([*command, *args.pytest_args], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
