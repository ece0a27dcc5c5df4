"""Drift from the base model: the per-step KL against a float64 reference built from diffusers'
own DDIM step, the trajectory KL (zero for the base, no second model), sample diversity, the
KL penalty (free when off, pulls towards the base when on), and the guard's rules."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config
from diffusers import DDIMScheduler
from PIL import Image

from ddpo_lite import trainer
from ddpo_lite.config import GuardConfig
from ddpo_lite.drift import diversity, trajectory_kl
from ddpo_lite.guard import Guard
from ddpo_lite.run_files import epoch_summary
from ddpo_lite.sampling import ddim_kl
from ddpo_lite.trainer import build_components, make_accelerator, train
from ddpo_lite.update import UpdateSettings, accumulate_step


@pytest.mark.parametrize("step_index", [0, 5, 9])
def test_ddim_kl_matches_diffusers_in_float64(step_index):
    scheduler = DDIMScheduler(  # Stable Diffusion's scheduler config
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    scheduler.set_timesteps(10)
    t = int(scheduler.timesteps[step_index])
    gen = torch.Generator().manual_seed(step_index)
    x_t = torch.randn(3, 4, 8, 8, generator=gen)
    eps_policy = torch.randn(3, 4, 8, 8, generator=gen)
    eps_base = eps_policy + 0.1 * torch.randn(3, 4, 8, 8, generator=gen)
    eta = 1.0

    # reference: diffusers' step with zero noise is the mean; its variance formula gives std
    def mean(eps):
        zero = torch.zeros_like(x_t)
        out = scheduler.step(eps, t, x_t, eta=eta, variance_noise=zero).prev_sample
        return out.double()

    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    std = eta * math.sqrt(float(scheduler._get_variance(t, prev_t)))
    expected = ((mean(eps_policy) - mean(eps_base)) ** 2 / (2 * std**2)).mean(dim=(1, 2, 3))
    got = ddim_kl(scheduler, eps_policy, eps_base, t, x_t, eta)
    torch.testing.assert_close(got.double(), expected, rtol=2e-4, atol=1e-7)
    assert torch.all(got > 0)


def _components(tmp_path, *overrides):
    config = tiny_config(tmp_path, "sample.num_steps=4", *overrides)
    accelerator = make_accelerator(config)
    return config, accelerator, build_components(config, accelerator)


def _sample(config, accelerator, run, n=2):
    from ddpo_lite.trainer import sample_epoch

    config.sample.batch_size = n
    config.sample.num_batches_per_epoch = 1
    rewards = lambda images, prompts, metadata: (np.zeros(len(images)), {})  # noqa: E731
    return sample_epoch(
        run, ["a cat", "a dog"], config, torch.Generator().manual_seed(0), accelerator, rewards
    )


def _set_lora_b(unet, scale, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * scale)


def test_trajectory_kl_is_zero_for_the_base_and_leaves_the_policy_on(tmp_path):
    config, accelerator, run = _components(tmp_path)
    samples = _sample(config, accelerator, run)
    # a fresh LoRA (B = 0) is the base model: KL exactly 0
    assert torch.all(trajectory_kl(run.policy, samples.trajectory) == 0)
    _set_lora_b(run.denoiser, 0.05)
    x = samples.trajectory.latents[:1, 0]
    t = samples.trajectory.timesteps[:1, 0]
    embeds = samples.trajectory.prompt_embeds[:1]
    before = run.denoiser(x, t, encoder_hidden_states=embeds).sample
    kl = trajectory_kl(run.policy, samples.trajectory)
    assert kl.shape == (2,) and torch.all(kl > 0)
    after = run.denoiser(x, t, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(before, after, rtol=0, atol=0)  # adapters back on
    accelerator.end_training()


def test_diversity_closed_form():
    black = Image.new("RGB", (8, 8), (0, 0, 0))
    white = Image.new("RGB", (8, 8), (255, 255, 255))
    gray = Image.new("RGB", (8, 8), (51, 51, 51))
    assert diversity([black, black, black], ["p"] * 3) == 0
    # pairs (black, white) = 1.0 for prompt a; (black, gray) = 0.2 for prompt b
    assert diversity([black, white, black, gray], ["a", "a", "b", "b"]) == pytest.approx(0.6)
    assert math.isnan(diversity([black, white], ["a", "b"]))


def test_kl_penalty_is_free_when_off_and_pulls_to_the_base_when_on(tmp_path, monkeypatch):
    config, accelerator, run = _components(tmp_path)
    samples = _sample(config, accelerator, run)
    _set_lora_b(run.denoiser, 0.05)
    traj = samples.trajectory
    cols = torch.arange(4).repeat(2, 1)
    zero = torch.zeros(2)  # no advantage: only the penalty can move the LoRA
    valid = torch.ones(2, dtype=torch.bool)

    calls = []
    original = type(run.denoiser).disable_adapters
    monkeypatch.setattr(
        type(run.denoiser),
        "disable_adapters",
        lambda self: (calls.append(1), original(self))[1],
    )
    off = UpdateSettings("ddpo-is", 0.2, kl_coef=0.0)
    accumulate_step(accelerator, run.policy, run.model, [(traj, cols, zero, valid)], off, 0)
    assert calls == []  # kl_coef = 0: no base forward at all
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in run.params)

    on = UpdateSettings("ddpo-is", 0.2, kl_coef=1.0)
    kl_before = trajectory_kl(run.policy, traj)
    for _ in range(5):
        run.optimizer.zero_grad(set_to_none=True)
        stats = accumulate_step(
            accelerator, run.policy, run.model, [(traj, cols, zero, valid)], on, 0
        )
        run.optimizer.step()
    assert calls and stats["kl_penalty"] > 0
    kl_after = trajectory_kl(run.policy, traj)
    assert kl_after.sum() < kl_before.sum()
    accelerator.end_training()


def test_guard_rules():
    guard = Guard(GuardConfig(patience=2, max_kl=1.0, min_diversity=0.1))
    assert guard.check({"kl_to_base": 0.5, "diversity": 0.2}) is None
    assert "guard.max_kl" in guard.check({"kl_to_base": 1.5, "diversity": 0.2})
    assert "guard.min_diversity" in guard.check({"kl_to_base": 0.5, "diversity": 0.05})
    assert guard.observe_eval(1.0, 0) and guard.best_epoch == 0
    assert guard.observe_eval(2.0, 3) and guard.best_epoch == 3
    assert not guard.observe_eval(1.5, 6) and guard.check({}) is None
    assert not guard.observe_eval(float("nan"), 9)
    assert "guard.patience" in guard.check({})
    restored = Guard(GuardConfig(patience=2))
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()
    assert Guard(GuardConfig()).check({"kl_to_base": 1e9, "diversity": 0}) is None  # all off


def test_metrics_carry_kl_and_diversity(tmp_path):
    config = tiny_config(
        tmp_path,
        "num_epochs=2",
        "sample.num_steps=3",
        "sample.num_batches_per_epoch=1",
        "guard.kl_every=1",
    )
    rows = train(config, show_progress=False).metrics
    assert rows[0]["kl_to_base"] == 0  # the first epoch samples from the base model
    assert rows[1]["kl_to_base"] > 0 and rows[1]["kl_seconds"] > 0
    assert 0 < rows[1]["diversity"] < 1
    assert "kl to base" in epoch_summary(1, 2, rows[1])


def test_kl_is_measured_only_on_the_epochs_that_use_it(tmp_path, monkeypatch):
    """Every guard.kl_every epochs and after the last; every epoch for guard.max_kl; never at
    kl_every 0 without max_kl. Counted on the trainer's calls of trajectory_kl."""
    calls = []
    real = trainer.trajectory_kl
    monkeypatch.setattr(trainer, "trajectory_kl", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = ["num_epochs=5", "sample.num_steps=2", "sample.num_batches_per_epoch=1"]
    rows = train(
        tiny_config(tmp_path / "a", *common, "guard.kl_every=2"), show_progress=False
    ).metrics
    assert ["kl_to_base" in row for row in rows] == [False, True, False, True, True]
    assert len(calls) == 3
    config = tiny_config(tmp_path / "b", *common, "guard.kl_every=0")
    assert not trainer.measures_kl(config, 4)
    config.guard.max_kl = 10.0
    assert all(trainer.measures_kl(config, e) for e in range(5))
    config.guard.kl_samples = 0
    assert not any(trainer.measures_kl(config, e) for e in range(5))


def test_the_guard_stops_a_drifting_run_and_says_why(tmp_path, capsys):
    """A run whose KL from the base passes guard.max_kl stops after that epoch, checkpointed,
    naming the rule; the same run with the bound out of reach runs to the end."""
    common = [
        "num_epochs=4",
        "sample.num_steps=3",
        "sample.num_batches_per_epoch=1",
        "train.learning_rate=5e-2",
        "log_with=[]",
        "guard.kl_every=1",
    ]
    free = train(tiny_config(tmp_path / "free", *common), show_progress=False)
    kls = [row["kl_to_base"] for row in free.metrics]
    assert free.stop_reason is None and len(kls) == 4 and kls[0] == 0 and max(kls) > 0
    # a bound between the first positive KL and the largest: the guard must fire at the
    # first epoch whose KL exceeds it
    bound = (min(k for k in kls if k > 0) + max(kls)) / 2
    fires_at = next(i for i, k in enumerate(kls) if k > bound)
    guarded = train(
        tiny_config(tmp_path / "guarded", *common, f"guard.max_kl={bound}"), show_progress=False
    )
    assert guarded.stopped_epoch == fires_at + 1 and "guard.max_kl" in guarded.stop_reason
    assert len(guarded.metrics) == fires_at + 1
    out = guarded.output_dir
    assert (out / "checkpoints" / f"epoch_{fires_at + 1:04d}").is_dir()
    assert json.loads((out / "stopped.json").read_text())["epoch"] == fires_at + 1
    assert f"stopped after epoch {fires_at + 1} by guard.max_kl" in capsys.readouterr().out
