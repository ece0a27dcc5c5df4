"""The guard against over-optimisation on the shapes world (issue 7 item 4).

On the shipped shapes model (`load_pipeline("shapes")`): a deliberately hackable reward pushed
hard runs away from the base model and the guard stops it; a healthy run with the same guard
goes to the end. Why no "the reward rises" test here: docs/ALGORITHM.md, "What it takes to learn".
"""

from __future__ import annotations

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
