"""Every shipped preset, rehearsed on the CPU with its own levers.

A preset is only tested if it runs as shipped: the shipped GPU presets once crashed at their
first checkpoint (8-bit AdamW's nested state) while every test ran them with 8-bit AdamW off.
So each preset found in presets/ runs through the command line with only what a CPU cannot do
or afford changed (`rehearsal_overrides`): the model (`tiny`, `tiny-sdxl` for an SDXL
preset, `tiny-sd3` for an SD3 one), the sizes (resolution included, an SDE window clamped to the
shorter chain), fp16 -> bf16 (float32 on a CPU that emulates bf16), a bitsandbytes-quantized
base (diffusers quantizes only on a GPU) left unquantized, and a model reward replaced by the same
reward code on a tiny random-weight twin of its model (aesthetic, PickScore) or by a model-free
one. Every memory lever (8-bit AdamW, half base, gradient
checkpointing, attention, offloads, VAE slicing, micro-batches, timestep chunks), the
evaluation, the guard and the trackers stay as shipped. Each preset: 2 epochs with a checkpoint,
`--resume` to 3, `sample`, `export` (kohya or ComfyUI's keys, by family).
"""

import json

import pytest
import torch
from conftest import half_precision_is_emulated
from safetensors.torch import load_file, save_file
from test_rewards_models import published_head_state, save_tiny_clip

from ddpo_lite.bench.estimate import is_flux, is_flux2, is_sd3, is_sdxl
from ddpo_lite.cli import main
from ddpo_lite.config import Config, list_presets, load_config

#: Rewards that need no model; every other registered reward loads one.
MODEL_FREE = ("jpeg_compressibility", "jpeg_incompressibility", "shapes_")


@pytest.fixture(scope="module")
def aesthetic_twin(tmp_path_factory):
    """A tiny CLIP (projection 768, as ViT-L/14's) and a random head in the published layout,
    in one folder: what `reward.models.aesthetic` names."""
    folder = tmp_path_factory.mktemp("aesthetic-twin")
    save_tiny_clip(folder, projection_dim=768)
    save_file(published_head_state(), folder / "aesthetic-model.safetensors")
    return folder


@pytest.fixture(scope="module")
def clip_twin(tmp_path_factory):
    """A tiny CLIP in one folder: what `reward.models.pickscore` names (PickScore is a CLIP)."""
    folder = tmp_path_factory.mktemp("clip-twin")
    save_tiny_clip(folder, seed=7)
    return folder


def rehearsal_overrides(config: Config, twins: dict) -> list[str]:
    """What a CPU rehearsal changes: the model, the sizes, fp16 and model rewards. Nothing else."""
    s, t = config.sample, config.train
    tiny = (
        "tiny-flux2"
        if is_flux2(config)
        else "tiny-flux"
        if is_flux(config)
        else "tiny-sd3"
        if is_sd3(config)  # shapes-flow too: SD3 without T5, as tiny-sd3
        else "tiny-sdxl"
        if is_sdxl(config)
        else "tiny"
    )
    steps = min(s.num_steps, 3)
    sets = [
        f'model.name="{tiny}"',
        "sample.resolution=0",  # the tiny model's own 32 px
        "num_epochs=2",
        f"sample.num_steps={steps}",
        f"sample.batch_size={max(2, s.group_size)}",
        "sample.num_batches_per_epoch=2",
        f"train.batch_size={min(t.batch_size, 2)}",
        f"train.gradient_accumulation={min(t.gradient_accumulation, 2)}",
        "memory.cpu=true",
    ]
    if s.sde_window_size:
        window = min(s.sde_window_size, steps)
        sets += [
            f"sample.sde_window_size={window}",
            f"sample.sde_window_range={min(s.sde_window_range, steps - window + 1)}",
        ]
    single = [t for t in config.lora.target_modules if t.startswith("single_transformer_blocks.")]
    if single and tiny == "tiny-flux2":  # klein-4B's 20 single blocks by index; the tiny one has 1
        kept = [t for t in config.lora.target_modules if t not in single[1:]]
        sets.append(f"lora.target_modules={kept!r}")
    if config.memory.quantize_base in ("nf4", "int8"):
        sets.append('memory.quantize_base="none"')  # diffusers' bitsandbytes quantizer: GPU only
    if config.memory.mixed_precision != "no" and half_precision_is_emulated():
        # a CPU without bf16 kernels runs it 30-50x slower than float32 (7 of the 13 presets took
        # 75 s each): float32 there; half precision under the levers stays covered on such a CPU
        # by the bf16 tests of test_trainer, test_families and test_flow_sde
        sets.append('memory.mixed_precision="no"')
    elif config.memory.mixed_precision == "fp16":
        sets.append('memory.mixed_precision="bf16"')  # CPU autocast is bf16
    if config.memory.use_8bit_adam:
        # the tiny UNet's rank-4 LoRA tensors are below bitsandbytes' 4096-element threshold;
        # at rank 128 every one of them has 8-bit state, as the real model's larger ones do
        sets += ["lora.rank=128", "lora.alpha=128"]
    if config.eval.every:
        sets.append("eval.max_prompts=1")
    names = list(config.reward.weights) or [config.reward.name]
    for name in names:
        if name in twins:
            sets.append(f'reward.models.{name}="{twins[name]}"')
        elif not name.startswith(MODEL_FREE):
            assert not config.reward.weights, "replace a model reward inside a weighted sum"
            sets.append('reward.name="jpeg_compressibility"')
    return sets


def _cli(*args: str) -> int:
    return main([str(a) for a in args])


def _sets(overrides: list[str]) -> list[str]:
    return [x for item in overrides for x in ("--set", item)]


@pytest.mark.slow
@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_runs_as_shipped(preset, tmp_path, aesthetic_twin, clip_twin):
    shipped = load_config(preset)
    twins = {"aesthetic": aesthetic_twin, "pickscore": clip_twin}
    overrides = rehearsal_overrides(shipped, twins)
    rehearsed = load_config(preset, overrides)
    # the levers are the preset's own
    assert rehearsed.memory.use_8bit_adam == shipped.memory.use_8bit_adam
    assert rehearsed.memory.half_base == shipped.memory.half_base
    assert rehearsed.memory.gradient_checkpointing == shipped.memory.gradient_checkpointing
    assert rehearsed.train.micro_batch_size == shipped.train.micro_batch_size
    assert rehearsed.train.timestep_chunk == shipped.train.timestep_chunk
    assert rehearsed.eval.every == shipped.eval.every
    assert rehearsed.guard == shipped.guard

    out = tmp_path / "run"
    assert _cli("train", "--preset", preset, "--output", out, "--quiet", *_sets(overrides)) == 0
    checkpoint = out / "checkpoints" / "epoch_0002"
    assert (checkpoint / "state.json").is_file()
    if shipped.memory.use_8bit_adam:  # the state that once crashed the first checkpoint
        state = load_file(checkpoint / "optimizer.safetensors")
        assert any(v.dtype == torch.uint8 for v in state.values())

    assert _cli("train", "--resume", out, "--quiet", "--set", "num_epochs=3") == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert (out / "checkpoints" / "epoch_0003").is_dir()

    shots = tmp_path / "shots"
    lora = out / "lora"
    assert _cli("sample", "--lora", lora, "--prompt", "a cat", "--num", 1, "--output", shots) == 0
    assert len(list(shots.glob("*.png"))) >= 1
    # kohya for a UNet family, ComfyUI's diffusers-style keys for a transformer one
    exported = tmp_path / "exported.safetensors"
    assert _cli("export", lora, "--output", exported) == 0
    tensors = load_file(exported)
    assert len(tensors) > 0
    transformer = is_sd3(shipped) or is_flux(shipped) or is_flux2(shipped)
    prefix = "transformer." if transformer else "lora_unet_"
    assert all(k.startswith(prefix) for k in tensors), sorted(tensors)[:3]
