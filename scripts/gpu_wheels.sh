#!/usr/bin/env bash
# Download, here (with network), the wheels that scripts/gpu_bench.sh installs on the GPU
# machine, into wheels/ (git-ignored). That machine has Python 3.12, torch 2.11 (CUDA 13.0),
# transformers, peft, accelerate, pillow, rich, safetensors and huggingface-hub, but neither
# diffusers nor bitsandbytes, and no network.
#
#     scripts/gpu_wheels.sh                 # then: the device run with carry ["wheels"]
#
# What travels (sizes as downloaded on 2026-12-01):
#     diffusers 0.42.1            6.1 MiB   pure Python
#     importlib_metadata 10.2.0   0.03 MiB  diffusers declares it (on 3.12 it imports the standard
#                                           library's importlib.metadata; carried in case)
#     bitsandbytes 0.50.2        13.3 MiB   slimmed from 41.1 MiB: only its CPU and CUDA 12.8 /
#                                           13.0 / 13.2 libraries (the CUDA 11.8-12.6, ROCm and
#                                           XPU builds are dropped; the wheel's RECORD with them)
#     total                      19.4 MiB   plus the tracked tree (~14.4 MiB): ~34 MiB of the
#                                           64 MiB a device call may carry
# BNB_FULL=1 keeps the whole bitsandbytes wheel (~62 MiB in all: it fits, barely). Without
# bitsandbytes at all, 8-bit Adam falls back to torch AdamW (said per preset in bench.json and
# estimated as such) and flux-pickscore (NF4 base) fails at setup, its reason recorded.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d wheels \
    diffusers==0.42.1 importlib_metadata==10.2.0 bitsandbytes==0.50.2
if [ "${BNB_FULL:-0}" != 1 ]; then
    python3 - <<'PY'
import pathlib
import re
import zipfile

keep = re.compile(r"libbitsandbytes_(cpu|cuda128|cuda13\d)\.so$")
for wheel in pathlib.Path("wheels").glob("bitsandbytes-*.whl"):
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            dropped = lambda name: name.endswith(".so") and not keep.search(name)  # noqa: E731
            if dropped(info.filename):
                continue
            data = zin.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                rows = [r for r in data.decode().splitlines() if not dropped(r.split(",")[0])]
                data = ("\n".join(rows) + "\n").encode()
            zout.writestr(info, data)
    slim.replace(wheel)
PY
fi
ls -l wheels
du -sh wheels
