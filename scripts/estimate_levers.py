"""The memory levers one by one, predicted by the meta-device estimate: a markdown table.

What: for a preset (default sdxl-aesthetic) at several resolutions, the predicted peak on the card
(allocated x allocator overhead + CUDA context, as `ddpo-lite bench --estimate` prints it) as the
levers are switched on cumulatively, from none to the preset's own. Why: which lever buys what,
before any GPU has run it. Predictions, not measurements: the estimate's assumptions apply.

    OMP_NUM_THREADS=1 python scripts/estimate_levers.py [--preset sdxl-aesthetic] [--res 1024 768 512]
    OMP_NUM_THREADS=1 python scripts/estimate_levers.py --preset sd35-pickscore --res 512 1024
    OMP_NUM_THREADS=1 python scripts/estimate_levers.py --preset sd35-pickscore --res 512 1024 \
        --set 'model.name="stabilityai/stable-diffusion-3.5-large"'     # SD3.5 Large

A flow-matching transformer preset (SD3) gets its own steps (`FLOW_STEPS`: no attention step,
its processors are SDPA already; then the quantized base and where the text encoders run), and
rows marked "instead" replace the step above them rather than add to it. The FLUX presets
(flux-pickscore, flux2-pickscore) take the same steps without drop_t5 (an SD3-only option).
"""

from __future__ import annotations

import argparse

from ddpo_lite.bench.estimate import GiB, estimate
from ddpo_lite.config import load_config

#: Cumulative steps: (label, overrides added to the previous step's).
STEPS = [
    (
        "no memory lever (fp32 weights under fp16 autocast, math attention), 1 sample x 1 "
        "timestep per backward",
        [
            "memory.half_base=false",
            "memory.attention='math'",
            "memory.gradient_checkpointing=false",
            "memory.use_8bit_adam=false",
            "memory.vae_slicing=false",
            "memory.offload_text_encoder=false",
            "memory.offload_reward=false",
            "reward.overlap=true",
            "train.micro_batch_size=1",
            "train.timestep_chunk=1",
        ],
    ),
    ("+ fp16 frozen weights (half_base)", ["memory.half_base=true"]),
    ("+ SDPA attention", ["memory.attention='sdpa'"]),
    ("+ text encoders off the GPU", ["memory.offload_text_encoder=true"]),
    ("+ VAE slicing", ["memory.vae_slicing=true"]),
    ("+ gradient checkpointing", ["memory.gradient_checkpointing=true"]),
    ("+ 8-bit AdamW", ["memory.use_8bit_adam=true"]),
    ("+ reward model off the GPU between calls", ["memory.offload_reward=true"]),
    ("+ reward scored after each batch (overlap off)", ["reward.overlap=false"]),
]


#: The SD3 steps: (label, overrides, cumulative?). A row that is not cumulative is an
#: alternative to the previous row, not kept for the next.
FLOW_STEPS = [
    (
        "no memory lever (fp32 weights under bf16 autocast), 1 sample x 1 timestep per backward",
        [
            "memory.half_base=false",
            "memory.gradient_checkpointing=false",
            "memory.use_8bit_adam=false",
            "memory.vae_slicing=false",
            "memory.offload_text_encoder=false",
            "memory.encode_on_cpu=false",
            "memory.offload_reward=false",
            "memory.quantize_base='none'",
            "memory.drop_t5=false",
            "reward.overlap=true",
            "train.micro_batch_size=1",
            "train.timestep_chunk=1",
        ],
        True,
    ),
    ("+ bf16 frozen weights (half_base)", ["memory.half_base=true"], True),
    (
        "+ text encoders off the GPU (they visit to encode)",
        ["memory.offload_text_encoder=true"],
        True,
    ),
    ("+ VAE slicing", ["memory.vae_slicing=true"], True),
    ("+ gradient checkpointing", ["memory.gradient_checkpointing=true"], True),
    ("+ 8-bit AdamW", ["memory.use_8bit_adam=true"], True),
    ("+ reward model off the GPU between calls", ["memory.offload_reward=true"], True),
    ("+ reward scored after each batch (overlap off)", ["reward.overlap=false"], True),
    ("+ fp8 frozen transformer (layerwise casting)", ["memory.quantize_base='fp8'"], False),
    ("+ int8 frozen transformer (bitsandbytes)", ["memory.quantize_base='int8'"], False),
    ("+ nf4 frozen transformer (bitsandbytes, QLoRA)", ["memory.quantize_base='nf4'"], True),
    ("+ without T5 (drop_t5), encoders visiting", ["memory.drop_t5=true"], False),
    (
        "+ text encoders run on the CPU (encode_on_cpu), with T5",
        ["memory.encode_on_cpu=true"],
        True,
    ),
]


def _steps(preset: str) -> list[tuple[str, list[str], bool]]:
    from ddpo_lite.bench.estimate import is_flux, is_flux2, is_sd3

    config = load_config(preset)
    if is_flux(config) or is_flux2(config):  # no T5 to drop (FLUX.1 needs it; FLUX.2 has none)
        return [s for s in FLOW_STEPS if "memory.drop_t5=true" not in s[1]]
    if is_sd3(config):
        return FLOW_STEPS
    return [(label, step, True) for label, step in STEPS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sdxl-aesthetic")
    parser.add_argument("--res", type=int, nargs="+", default=[1024, 768, 512])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    header = "| levers (cumulative) | " + " | ".join(f"{r} px" for r in args.res) + " |"
    rows = [header, "|" + " --- |" * (len(args.res) + 1)]
    overrides: list[str] = []
    for label, step, cumulative in _steps(args.preset):
        row = [*overrides, *step]
        if cumulative:
            overrides = row
        cells = []
        for res in args.res:
            config = load_config(args.preset, [*args.set, *row, f"sample.resolution={res}"])
            result = estimate(config)
            largest = max(result.phases, key=lambda n: result.phases[n].peak_bytes)
            cells.append(f"{result.device_bytes / GiB:.2f} ({largest})")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
