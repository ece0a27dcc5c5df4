"""Print docs/BENCHMARKS.md's memory-per-lever table: the meta-device estimate of every lever on and
off for the `aesthetic` preset (SD 1.5 at 512x512), one row per configuration. Estimates, not
measurements: run `ddpo-lite bench --model sd15-random` on a GPU for the measured column.

    OMP_NUM_THREADS=2 python scripts/memory_table.py
"""

from __future__ import annotations

from ddpo_lite.bench.estimate import Transients, build_meta_models, compose
from ddpo_lite.config import load_config

GiB = 2**30

ROWS = [
    (
        "`aesthetic` as shipped (lean: fp16 base, checkpointing, SDPA, 8-bit AdamW, chunk 2, micro-batch 1, text encoder and VAE offloaded, VAE slicing)",
        [],
    ),
    ("frozen weights fp32 (half_base off)", ["memory.half_base=false"]),
    ("gradient checkpointing off", ["memory.gradient_checkpointing=false"]),
    (
        "gradient checkpointing off, timestep chunk 1",
        ["memory.gradient_checkpointing=false", "train.timestep_chunk=1"],
    ),
    ("attention math", ["memory.attention='math'"]),
    ("attention xformers (counted as SDPA)", ["memory.attention='xformers'"]),
    ("32-bit AdamW", ["memory.use_8bit_adam=false"]),
    ("timestep chunk 1", ["train.timestep_chunk=1"]),
    ("timestep chunk 4", ["train.timestep_chunk=4"]),
    ("micro-batch 2", ["train.micro_batch_size=2"]),
    ("micro-batch 4 (the whole train batch)", ["train.micro_batch_size=4"]),
    (
        "micro-batch 0 and chunk 0 (4 samples x 50 timesteps per backward)",
        ["train.micro_batch_size=0", "train.timestep_chunk=0"],
    ),
    ("text encoder resident", ["memory.offload_text_encoder=false"]),
    ("VAE resident (offload_vae off)", ["memory.offload_vae=false"]),
    ("reward model offloaded", ["memory.offload_reward=true"]),
    ("VAE slicing off", ["memory.vae_slicing=false"]),
]
PRESETS = ["aesthetic-8gb", "aesthetic-6gb"]


def row(label: str, config) -> str:
    models = build_meta_models(config, 512)
    result = compose(config, models, Transients(models, config))
    phases = result.phases

    def gib(name: str) -> str:
        return f"{phases[name].peak_bytes / GiB:.2f}" if name in phases else "-"

    cells = [gib(n) for n in ("sampling", "reward", "training", "sampling+reward overlap")]
    cells += [f"{result.peak_bytes / GiB:.2f}", f"{result.device_bytes / GiB:.2f}"]
    return f"| {label} | " + " | ".join(cells) + " |"


def main() -> None:
    print(
        "| configuration | sampling | reward | training | sampling+reward overlap "
        "| run peak (allocated) | on the card (x1.10 + 0.5 GiB) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, overrides in ROWS:
        print(row(label, load_config("aesthetic", overrides)), flush=True)
    for name in PRESETS:
        print(row(f"preset `{name}`", load_config(name)), flush=True)


if __name__ == "__main__":
    main()
