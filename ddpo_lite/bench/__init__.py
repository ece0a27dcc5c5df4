"""Memory and speed: `ddpo-lite bench`, the meta-device memory estimate, and `train --vram`.

- `bench.py`: run a preset phase by phase and report peak memory, samples/s and s/epoch
  (`run_bench`, `add_bench_arguments`), or time our rollout against the diffusers pipeline;
- `estimate.py`: predict each phase's peak on the meta device, without a GPU, in seconds;
- `select.py`: `select_for_vram(config, gb)`, the levers that fit a card, from the estimate;
- `counting.py`: the live-tensor-byte counter and the meta-device autocast/attention it uses;
- `sd15.py`, `sdxl.py`, `sd3.py`, `flux.py`: the published architectures, random weights;
- `suite.py`: every shipped GPU preset in one command (scripts/gpu_bench.sh), JSON + markdown.

The names below load on first use: `python -m ddpo_lite.bench.suite` starts its workers
without importing torch in the driver. (`ddpo_lite.bench.estimate` is the module; its function
is `ddpo_lite.bench.estimate.estimate`.)
"""

_EXPORTS = {
    "add_bench_arguments": "ddpo_lite.bench.bench",
    "run_bench": "ddpo_lite.bench.bench",
    "Estimate": "ddpo_lite.bench.estimate",
    "select_for_vram": "ddpo_lite.bench.select",
    "over_card_warning": "ddpo_lite.bench.select",
    "suggested_vram": "ddpo_lite.bench.select",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ddpo_lite.bench' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
