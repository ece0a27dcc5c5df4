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
    assert hacked.stopped_epoch <= 2  # stopped after the 1st or 2nd of 3 epochs
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
    jpeg_incompressibility is +size. The shapes-alignment preset as shipped (5 DDIM steps, no CFG,
    groups of 4, the 3 noisiest steps trained, AdamW 1e-3), 6 epochs x 64 samples, seed 0.
    Evaluation: the 24 training captions x 4 images, base vs LoRA on the same noise.

    Measured (session 14, the preset without CFG), the paired change for training seeds 0 / 1 / 2:
    compressibility +0.0148 / +0.0265 / +0.0282 kB (standard errors 0.0017 / 0.0023 / 0.0024),
    incompressibility +0.0161 / +0.0292 / +0.0352 (0.0021 / 0.0026 / 0.0029): every run beyond 6.9
    standard errors. With CFG 5 (session 5) the same budget moved +0.003 to +0.016 kB at twice the
    cost an epoch. Threshold: 3 standard errors and 0.004 kB. ~50 s a run.
    """
    short = ["num_epochs=6", "eval.every=6", "eval.num_per_prompt=4"]
    for reward in ("jpeg_compressibility", "jpeg_incompressibility"):
        _, after = preset_run(tmp_path, reward, f'reward.name="{reward}"', *short)
        gain, se = after["eval_train_gain"], after["eval_train_gain_se"]
        assert gain > 3 * se and gain > 0.004, (reward, after)


def test_the_shapes_alignment_preset_makes_the_model_follow_its_prompts(tmp_path):
    """Issue 5 item 5: the shapes-alignment preset, shortened to 18 of its 24 epochs (seed 0),
    raises alignment (colour + shape probability read from pixels, 0-2) beyond the noise of its
    own evaluation: 24 training captions x 8 images, and 24 held-out captions x 8, base and LoRA
    on the same noise; the run logs the paired change and its standard error (`eval_*_gain`,
    `eval_*_gain_se`).

    Measured (session 6), the change over training seeds 0 / 1 / 2 on the training captions:
    +0.046 / +0.136 / +0.155 after 12 epochs (standard errors 0.020 / 0.024 / 0.029), +0.109 /
    +0.174 / +0.230 after 18, +0.165 / +0.234 / +0.280 after 24; held-out captions +0.071 / +0.182 /
    +0.194 after 18 (docs/ALGORITHM.md). Seed 0, the slowest, is the one tested: it measured
    +0.109 ± 0.025 and +0.071 ± 0.019 here. Without CFG the base model follows its prompts less
    well (0.78 against 1.26 with CFG 5), so RL has something to fix (colour, mostly), and an
    epoch costs half as much. ~115 s.
    """
    before, after = preset_run(tmp_path, "alignment", "num_epochs=18", "eval.every=18")
    assert after["eval_train_gain"] > 3 * after["eval_train_gain_se"], (before, after)
    assert after["eval_heldout_gain"] > 2 * after["eval_heldout_gain_se"], (before, after)


def test_the_nft_preset_makes_the_model_follow_its_prompts(tmp_path):
    """Issue 18 item 5: shapes-alignment-nft (DiffusionNFT, no trajectory kept, every step
    trained, AdamW 3e-3), shortened to 9 of its 12 epochs (seed 0), raises alignment beyond the
    evaluation's noise on the training and the held-out captions.

    Measured (session 7), the change after 6 / 9 / 12 epochs, seed 0: training captions +0.132 /
    +0.242 / +0.297 (standard error 0.036 / 0.041 / 0.045), held-out +0.169 / +0.208 / +0.274;
    seed 1: +0.131 / +0.246 / +0.322 and +0.185 / +0.273 / +0.302. The DDPO-IS preset reaches
    +0.165 / +0.108 (seed 0) after 24 epochs (docs/BENCHMARKS.md). ~50 s.
    """
    config = load_config(
        "shapes-alignment-nft",
        [f'output_dir="{tmp_path / "nft"}"', "log_with=[]", "keep_checkpoints=1"]
        + ["num_epochs=9", "eval.every=9"],
    )
    result = train(config, show_progress=False)
    after = result.metrics[-1]
    assert after["eval_train_gain"] > 3 * after["eval_train_gain_se"], after
    assert after["eval_heldout_gain"] > 2 * after["eval_heldout_gain_se"], after
    assert result.metrics[-1]["epoch"] == 9
