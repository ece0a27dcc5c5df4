"""Held-out evaluation: fixed noise makes evaluations comparable (the same weights give the same
numbers), a run logs them per group with grids and keeps the best LoRA, and `ddpo-lite eval`
compares a LoRA with its base model on the same noise."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from rich.progress import Progress

from ddpo_lite import trainer
from ddpo_lite.cli import main
from ddpo_lite.evaluate import compare, evaluate, read_prompt_file
from ddpo_lite.grid import CAPTION, CELL
from ddpo_lite.run_files import epoch_summary
from ddpo_lite.trainer import build_components, eval_policy, make_accelerator, train


def _brightness(images, prompts, metadata):
    values = [np.asarray(image, dtype=np.float64).mean() / 255 for image in images]
    return np.array(values), {}


@pytest.fixture
def heldout(tmp_path):
    (tmp_path / "animals.txt").write_text("# unseen\na red fox\nan owl\n")
    (tmp_path / "objects.txt").write_text("a chair\na cup\n")
    return {"animals": str(tmp_path / "animals.txt"), "objects": str(tmp_path / "objects.txt")}


def test_two_evaluations_of_the_same_weights_are_identical(tmp_path, heldout):
    config = tiny_config(tmp_path, "sample.num_steps=3")
    accelerator = make_accelerator(config)
    run = build_components(config, accelerator)
    gen = torch.Generator().manual_seed(0)
    for name, p in run.denoiser.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    groups = {"animals": ["a red fox", "an owl"], "objects": ["a chair"]}

    def once(seed):
        return evaluate(run.policy, groups, _brightness, num_per_prompt=3, seed=seed)

    first, second, other = once(7), once(7), once(8)
    accelerator.end_training()
    for name in groups:
        np.testing.assert_array_equal(first[name].rewards, second[name].rewards)
        assert first[name].rewards.shape == (len(groups[name]), 3)
        assert first[name].diversity == second[name].diversity > 0
    assert not np.array_equal(first["animals"].rewards, other["animals"].rewards)
    rows = compare(first, second)
    assert all(row["difference"] == 0 for row in rows)


def test_eval_num_steps_samples_the_evaluation_with_its_own_steps(tmp_path):
    """Training at 2 steps, judged at 4: the evaluation equals one of a policy built at 4 steps
    (same noise, same weights); eval.num_steps 0 is the training policy itself."""
    groups = {"animals": ["a red fox", "an owl"]}
    config = tiny_config(tmp_path, "sample.num_steps=2", "eval.num_steps=4")
    accelerator = make_accelerator(config)
    run = build_components(config, accelerator)
    judged = eval_policy(run.policy, config, accelerator.device)
    assert len(judged.sampler.scheduler.timesteps) == 4 and judged.denoiser is run.denoiser
    assert len(run.policy.sampler.scheduler.timesteps) == 2
    at_four = build_components(tiny_config(tmp_path, "sample.num_steps=4"), accelerator).policy
    ours = evaluate(judged, groups, _brightness, num_per_prompt=2, seed=3)
    reference = evaluate(at_four, groups, _brightness, num_per_prompt=2, seed=3)
    trained = evaluate(run.policy, groups, _brightness, num_per_prompt=2, seed=3)
    accelerator.end_training()
    np.testing.assert_array_equal(ours["animals"].rewards, reference["animals"].rewards)
    assert not np.array_equal(ours["animals"].rewards, trained["animals"].rewards)
    config.eval.num_steps = 0
    assert eval_policy(run.policy, config, "cpu") is run.policy


def eval_run_config(tmp_path, heldout, *overrides: str):
    """A short tiny run (one sample batch an epoch, no tracker) that evaluates the held-out groups."""
    groups = "{" + ", ".join(f'{k} = "{v}"' for k, v in heldout.items()) + "}"
    common = ["sample.num_batches_per_epoch=1", "log_with=[]", f"eval.prompts={groups}"]
    return tiny_config(tmp_path, *common, *overrides)


def test_a_run_logs_evaluations_and_keeps_the_best_lora(tmp_path, heldout):
    config = eval_run_config(
        tmp_path,
        heldout,
        "num_epochs=3",
        "sample.num_steps=3",
        "eval.every=1",
        "eval.num_per_prompt=2",
    )
    result = train(config, reward_fn=_brightness, show_progress=False)
    out = result.output_dir
    for row in result.metrics:
        for key in ("eval_animals_reward_mean", "eval_objects_reward_std", "eval_reward_mean"):
            assert key in row
    names = sorted(p.name for p in (out / "samples").glob("eval_epoch_*.png"))
    assert names == [f"eval_epoch_{i:04d}.png" for i in range(4)]  # 0 = the base model
    with Image.open(out / "samples" / "before_after.png") as pairs:  # base | epoch 3, per prompt
        prompts = sum(min(8, len(read_prompt_file(f))) for f in heldout.values())
        assert pairs.size == (4 * CELL, -(-2 * prompts // 4) * (CELL + CAPTION))
    base_row = json.loads((out / "eval_baseline.json").read_text())
    for row in result.metrics:  # each evaluation paired with the base's: the same noise
        for group in heldout:
            change = row[f"eval_{group}_reward_mean"] - base_row[f"eval_{group}_reward_mean"]
            assert row[f"eval_{group}_gain"] == pytest.approx(change, abs=1e-9)
            assert row[f"eval_{group}_gain_se"] > 0
    baseline = base_row["eval_reward_mean"]
    evals = [row["eval_reward_mean"] for row in result.metrics]
    if max(evals) > baseline:  # the best LoRA is the best evaluation's
        best = int(np.argmax(evals)) + 1
        meta = json.loads((out / "best_lora" / "ddpo_lite.json").read_text())
        assert meta["epoch"] == best and meta["eval_reward_mean"] == pytest.approx(max(evals))
    else:
        assert not (out / "best_lora").exists()


def test_the_epoch_line_shows_each_groups_change_from_the_base():
    row = dict(reward_mean=1.0, reward_std=0.5, epoch_seconds=3.0, samples_per_second=20.0)
    row |= dict(peak_memory_bytes=2**30, eval_reward_mean=0.9, eval_train_reward_mean=0.95)
    row |= dict(eval_train_gain=0.1647, eval_train_gain_se=0.0281)
    row |= dict(eval_heldout_gain=-0.012, eval_heldout_gain_se=0.019)
    line = epoch_summary(23, 24, row)
    assert "eval 0.9  train +0.165 ± 0.028  heldout -0.012 ± 0.019" in line


def test_the_final_lora_is_evaluated_whatever_eval_every(tmp_path, heldout, monkeypatch):
    config = eval_run_config(
        tmp_path,
        heldout,
        "num_epochs=3",
        "sample.num_steps=2",
        "eval.every=2",
        "eval.num_per_prompt=1",
        "eval.num_steps=3",
    )
    steps = []
    real = trainer.evaluate

    def spy(policy, *args, **kwargs):
        steps.append(len(policy.sampler.scheduler.timesteps))
        return real(policy, *args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", spy)
    result = train(config, reward_fn=_brightness, show_progress=False)
    assert steps == [3, 3, 3]  # the baseline, epochs 2 and 3: eval.num_steps, not sample's 2
    evaluated = [row["epoch"] for row in result.metrics if "eval_reward_mean" in row]
    assert evaluated == [2, 3]
    names = sorted(p.name for p in (result.output_dir / "samples").glob("eval_epoch_*.png"))
    assert names == ["eval_epoch_0000.png", "eval_epoch_0002.png", "eval_epoch_0003.png"]


def test_a_resumed_run_sets_its_lora_beside_the_same_base_images(tmp_path, heldout):
    common = ["sample.num_steps=2", "eval.every=1", "eval.num_per_prompt=1"]
    common += ["train.learning_rate=0.05"]
    first = eval_run_config(tmp_path, heldout, "num_epochs=1", *common)
    train(first, reward_fn=_brightness, show_progress=False)
    samples = tmp_path / "run" / "samples"
    (samples / "before_after.png").unlink()
    rest = eval_run_config(tmp_path, heldout, "num_epochs=2", *common)
    train(rest, resume=True, reward_fn=_brightness, show_progress=False)

    def cell(path, column):  # an image of the grid's first row, without its caption
        with Image.open(path) as grid:
            return np.asarray(grid.crop((column * CELL, 0, (column + 1) * CELL, CELL)))

    # the base recomputed with the LoRA off is the one evaluated before training, pixel for pixel
    assert np.array_equal(
        cell(samples / "before_after.png", 0), cell(samples / "eval_epoch_0000.png", 0)
    )
    assert np.array_equal(
        cell(samples / "before_after.png", 1), cell(samples / "eval_epoch_0002.png", 0)
    )
    assert not np.array_equal(
        cell(samples / "before_after.png", 0), cell(samples / "before_after.png", 1)
    )


def test_eval_command_compares_base_and_tuned(tmp_path, heldout, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--output", str(out), "--quiet"]
    for item in ("num_epochs=1", "sample.num_steps=3", "sample.num_batches_per_epoch=1"):
        argv += ["--set", item]
    argv += ["--set", "train.learning_rate=0.05", "--set", "log_with=[]"]
    assert main(argv) == 0
    capsys.readouterr()
    bars = []

    def progress_bars(console, enabled):
        bars.append(Progress(console=console, disable=not enabled))
        return bars[-1]

    monkeypatch.setattr(trainer, "progress_bars", progress_bars)
    code = main(
        ["eval", "--lora", str(out / "lora"), "--prompts", heldout["animals"], "--num", "2"]
        + ["--prompts", heldout["objects"], "--steps", "3", "--json", str(tmp_path / "e.json")]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "animals" in printed and "objects" in printed and "tuned - base" in printed
    written = json.loads((tmp_path / "e.json").read_text())  # the table's numbers
    assert [row["group"] for row in written["groups"]] == ["animals", "objects"]
    for row in written["groups"]:
        assert row["n"] == 4 and f"{row['difference']:+.4g}" in printed
    # a bar per model, one step per prompt (2 + 2)
    shown = [(t.description, t.completed, t.total) for t in bars[0].tasks]
    assert shown == [("base model", 4, 4), ("with the LoRA", 4, 4)]
    assert any(row["difference"] != 0 for row in written["groups"])  # the LoRA changes images
    # at strength 0 the LoRA changes nothing: the tuned column is the base's, to the bit
    scaled = ["eval", "--lora", str(out / "lora"), "--prompts", heldout["animals"], "--num", "2"]
    scaled += ["--steps", "3", "--scale", "0", "--json", str(tmp_path / "s.json"), "--quiet"]
    assert main(scaled) == 0
    (row,) = json.loads((tmp_path / "s.json").read_text())["groups"]
    assert row["difference"] == 0 and row["tuned"] == row["base"] == written["groups"][0]["base"]
    capsys.readouterr()
    assert main(["eval", "--model", "tiny", "--prompts", heldout["animals"], "--num", "1"]) == 2
    assert "reward" in capsys.readouterr().err  # no LoRA, no --reward: says what is missing
    base_only = ["eval", "--model", "tiny", "--reward", "jpeg_compressibility", "--steps", "3"]
    base_only += ["--prompts", heldout["animals"], "--num", "1", "--json", str(tmp_path / "b.json")]
    assert main(base_only) == 0 and "base mean" in capsys.readouterr().out
    (row,) = json.loads((tmp_path / "b.json").read_text())["groups"]
    assert row["group"] == "animals" and row["n"] == 2 and row["base_std"] >= 0


def test_eval_never_runs_code_named_in_the_lora(tmp_path, heldout, capsys):
    """A LoRA from a model site records its run's reward; `ddpo-lite eval --lora` must not
    import a Python file named there (that is running a stranger's code), only one the user
    names with --reward."""
    from ddpo_lite.cli import main

    marker = tmp_path / "ran.txt"
    code = tmp_path / "stranger.py"
    code.write_text(
        "import numpy as np\n"
        f"open({str(marker)!r}, 'a').write('ran\\n')\n"
        "def score(images, prompts, metadata):\n"
        "    return np.zeros(len(images)), {}\n"
    )
    config = tiny_config(
        tmp_path, "num_epochs=1", "sample.num_steps=2", f'reward.name="{code}:score"'
    )
    config.log_with = []
    train(config, show_progress=False)
    marker.unlink()
    lora = str(tmp_path / "run" / "lora")
    args = ["eval", "--lora", lora, "--prompts", heldout["animals"], "--num", "1", "--steps", "2"]
    assert main(args) == 2
    assert not marker.exists()
    assert "--reward" in capsys.readouterr().err
    assert main([*args, "--reward", f"{code}:score"]) == 0  # named by the user: it runs
    assert marker.exists()
