"""Memory and speed: `ddpo-lite bench`, the meta-device memory estimate, and `train --vram`.

- `bench.py`: run a preset phase by phase and report peak memory, samples/s and s/epoch
  (`run_bench`, `add_bench_arguments`), or time our rollout against the diffusers pipeline;
- `estimate.py`: predict each phase's peak on the meta device, without a GPU, in seconds;
- `select.py`: `select_for_vram(config, gb)`, the levers that fit a card, from the estimate;
- `counting.py`: the live-tensor-byte counter and the meta-device autocast/attention it uses;
- `sd15.py`: SD 1.5 and CLIP ViT-L/14 from their published configs, random weights.
"""

from ddpo_lite.bench.bench import add_bench_arguments, run_bench
from ddpo_lite.bench.estimate import Estimate, estimate
from ddpo_lite.bench.select import select_for_vram

__all__ = ["Estimate", "add_bench_arguments", "estimate", "run_bench", "select_for_vram"]
