#!/usr/bin/env bash
# The one GPU command: every shipped GPU preset measured with its own levers on its published
# architecture with random weights (nothing downloaded), beside its estimate and the family's
# diffusers pipeline; writes bench.json, bench.md (the tables for docs/BENCHMARKS.md) and
# bench.log into $OUT (default bench_out/). Method: ddpo_lite/bench/suite.py's docstring.
#
#     scripts/gpu_wheels.sh                         # here, once: wheels/ (diffusers, bitsandbytes)
#     bash scripts/gpu_bench.sh                     # there: the device tool's run, carry ["wheels"],
#                                                   #   timeout_s 540 (the driver's budget is 420 s)
#     bash scripts/gpu_bench.sh --cpu --tiny --budget-s 120   # a CPU, the tiny models (what CI runs)
#
# Other arguments go to the driver: --presets a,b (in that order), --budget-s S,
# --preset-timeout-s S, --pipeline-steps N, --epochs N. ddpo-lite runs from this checkout
# (PYTHONPATH), not installed; the wheels go into /tmp/ddpo-site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench_out}"
mkdir -p "$OUT"
if compgen -G "wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/ddpo-site wheels/*.whl || exit 1
    export PYTHONPATH="/tmp/ddpo-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# flux-pickscore's NF4 base: its random transformer is saved (24 GB in bf16) and loaded back
# quantized; RAM-backed when /dev/shm has room
shm_kb=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
if [ -z "${DDPO_LITE_BENCH_TMP:-}" ] && [ "${shm_kb:-0}" -gt 40000000 ]; then
    export DDPO_LITE_BENCH_TMP=/dev/shm
fi
python3 - <<'PY' 2>&1 | tee -a "$OUT/bench.log"
from importlib import metadata

import torch

print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", torch.cuda.is_available())
for name in ("diffusers", "transformers", "peft", "accelerate", "bitsandbytes"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "missing")
PY
python3 -m ddpo_lite.bench.suite --out "$OUT" "$@"
