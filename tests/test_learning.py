"""It learns, and the guard stops it when it learns the wrong thing, on the shipped shapes model.

Rises are judged by the run's own evaluations: the base model at epoch 0 and the LoRA at the end,
on the same prompts and the same noise (paired), so the only noise left is the training run's own.
Why the shapes model and not the random tiny one: docs/ALGORITHM.md, "What it takes to learn".
"""

from __future__ import annotations

import json

from ddpo_lite.config import load_config
from ddpo_lite.shapes import all_captions
from ddpo_lite.trainer import train


def shapes_config(tmp_path, name: str, *overrides: str):
    """A short run on the shapes model: 10 DDIM steps, 64 samples and one optimizer step per
    epoch, on 24 of the 120 captions."""
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(all_captions()[::5]) + "\n")  # 24 of the 120 captions
    return load_config(
        "tiny",
        [
            f'output_dir="{tmp_path / name}"',
            'model.name="shapes"',
            f'prompts.file="{captions}"',
            "sample.num_steps=10",
            "sample.batch_size=16",
            "sample.num_batches_per_epoch=4",
            "train.batch_size=16",
            "train.gradient_accumulation=4",
            "advantages.per_prompt_stat_tracking=false",
            f'eval.prompts={{train="{captions}"}}',
            "eval.num_per_prompt=2",
            "log_with=[]",
            "keep_checkpoints=1",
            *overrides,
        ],
    )


def test_guard_stops_a_runaway_hackable_run_and_spares_a_healthy_one(tmp_path):
    """Issue 7 item 4. Hackable: `shapes_red_share` (red pixels, whatever the prompt) on prompts
    that never ask for red, at an aggressive lr 1e-2: the first update moves the policy far from
    the base (measured KL 3.8 per step after one epoch, 48 after four, diversity 0.22 -> 0.15,
    images dark and muddy, red share not up: at this budget the runaway drift comes before the
    hack pays). Healthy: `shapes_alignment` at lr 3e-4 (KL 0.003 after one epoch). Same guard."""
    guard = ["guard.max_kl=1.0", "guard.min_diversity=0.12", "guard.kl_samples=4"]
    no_red = tmp_path / "no_red.txt"
    no_red.write_text("\n".join(c for c in all_captions()[::3] if "red" not in c) + "\n")
    short = ["num_epochs=3", "sample.num_batches_per_epoch=2", "train.gradient_accumulation=2"]
    hacked = train(
        shapes_config(
            tmp_path,
            "hack",
            'reward.name="shapes_red_share"',
            f'prompts.file="{no_red}"',
            "train.learning_rate=1e-2",
            *short,
            *guard,
        ),
        show_progress=False,
    )
    assert hacked.stop_reason is not None and "guard.max_kl" in hacked.stop_reason
    assert hacked.stopped_epoch < 2
    assert hacked.metrics[-1]["kl_to_base"] > 1.0

    healthy = train(
        shapes_config(
            tmp_path,
            "healthy",
            'reward.name="shapes_alignment"',
            "train.learning_rate=3e-4",
            *short,
            *guard,
        ),
        show_progress=False,
    )
    assert healthy.stop_reason is None and len(healthy.metrics) == 3
    assert max(row["kl_to_base"] for row in healthy.metrics) < 0.1


def preset_run(tmp_path, name: str, *overrides: str) -> tuple[dict, dict]:
    """The shapes-alignment preset, shortened by `overrides`: (baseline, final) evaluations."""
    config = load_config(
        "shapes-alignment",
        [f'output_dir="{tmp_path / name}"', "log_with=[]", "keep_checkpoints=1", *overrides],
    )
    result = train(config, show_progress=False)
    baseline = json.loads((result.output_dir / "eval_baseline.json").read_text())
    return baseline, result.metrics[-1]


def test_it_learns_jpeg_compressibility_and_the_opposite(tmp_path):
    """Issue 2 item 8, on the shapes model (the random tiny model's JPEG size has no signal the
    LoRA can move: docs/ALGORITHM.md). Reward, the paper's: -(size in kB) of the 32x32 image saved
    as RGB JPEG by PIL at quality 95 (bytes / 1000, `ddpo_lite/rewards/jpeg.py`);
    jpeg_incompressibility is +size. The shapes-alignment preset's settings (5 DDIM steps, groups
    of 4, the 3 noisiest steps trained, AdamW 1e-3), 6 epochs x 64 samples, seed 0. Evaluation:
    the 24 training captions x 4 images, base vs LoRA on the same noise.

    Measured (session 5), the rise on that evaluation for training seeds 0 / 1 / 2:
    compressibility +0.0080 / +0.0163 / +0.0029 kB, incompressibility +0.0069 / +0.0153 / +0.0103.
    Noise: the paired standard error of the evaluation is 0.0011-0.0013 kB at 8 images per caption
    (so ~0.0017 at the test's 4); every run moved its way, the run-to-run spread is in the size of
    the move. Threshold 0.004 kB (about 2.3 standard errors; seed 2's compressibility would miss
    it). 24 epochs change the size by -0.040 and +0.053 kB (standard error 0.003). ~75 s a run.
    """
    short = ["num_epochs=6", "eval.every=6", "eval.num_per_prompt=4"]
    for reward in ("jpeg_compressibility", "jpeg_incompressibility"):
        before, after = preset_run(tmp_path, reward, f'reward.name="{reward}"', *short)
        rise = after["eval_train_reward_mean"] - before["eval_train_reward_mean"]
        assert rise > 0.004, (reward, before, after)
