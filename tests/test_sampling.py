"""The DDIM step with log-prob, held against diffusers' DDIMScheduler.step and a float64 reference."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from ddpo_lite.sampling import ddim_step_with_logprob

SD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    num_train_timesteps=1000,
)


def make_scheduler(num_steps: int = 50, **overrides) -> DDIMScheduler:
    scheduler = DDIMScheduler(**{**SD_SCHEDULER, **overrides})
    scheduler.set_timesteps(num_steps)
    return scheduler


def first_middle_last(scheduler: DDIMScheduler) -> list[int]:
    steps = scheduler.timesteps.tolist()
    return [steps[0], steps[len(steps) // 2], steps[-1]]


def reference_logprob_f64(x_t, eps, x_prev, t, num_steps, eta):
    """Gaussian log-density of x_prev, from the DDIM formulas in float64, independently of both
    diffusers and ddpo_lite: betas from the scaled-linear schedule, a_prev at t - 1000 // N or
    alphas_cumprod[0] at the last step (set_alpha_to_one=False); mean over elements."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    prev_t = t - 1000 // num_steps
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[prev_t] if prev_t >= 0 else alphas_cumprod[0]
    x_t, eps, x_prev = x_t.double(), eps.double(), x_prev.double()
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * var.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    dens = -((x_prev - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return dens.flatten(1).mean(1)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_sample_follows_diffusers_step(eta):
    """(a) Same noise -> same x_{t-1} as diffusers; and over many draws the same mean and std."""
    scheduler = make_scheduler()
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8, generator=gen)
    eps = torch.randn(2, 4, 8, 8, generator=gen)
    for t in first_middle_last(scheduler):
        ours, _ = ddim_step_with_logprob(
            scheduler, eps, t, x_t, eta=eta, generator=torch.Generator().manual_seed(7)
        )
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7))
        theirs = scheduler.step(eps, t, x_t, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

        # distribution: empirical mean/std over 4000 draws vs diffusers' mean (zero noise) and std
        mean = scheduler.step(
            eps, t, x_t, eta=eta, variance_noise=torch.zeros_like(x_t)
        ).prev_sample
        std = (
            scheduler.step(eps, t, x_t, eta=eta, variance_noise=torch.ones_like(x_t)).prev_sample
            - mean
        )
        many = x_t[:1].expand(4000, -1, -1, -1)
        draws, _ = ddim_step_with_logprob(
            scheduler, eps[:1].expand_as(many), t, many, eta=eta, generator=gen
        )
        assert (draws.mean(0) - mean[0]).abs().max() < 5 * std[0].max() / 4000**0.5
        torch.testing.assert_close(draws.std(0).mean(), std[0].mean(), rtol=0.03, atol=0)


@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_logprob_of_diffusers_sample_matches_float64(eta):
    """(b) Scoring diffusers' own step(variance_noise=z).prev_sample gives the float64 density."""
    num_steps = 20
    scheduler = make_scheduler(num_steps)
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn(3, 4, 8, 8, generator=gen)
    eps = torch.randn(3, 4, 8, 8, generator=gen)
    for t in first_middle_last(scheduler):
        z = torch.randn(x_t.shape, generator=gen)
        x_prev = scheduler.step(eps, t, x_t, eta=eta, variance_noise=z).prev_sample
        _, log_prob = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=eta, prev_sample=x_prev)
        expected = reference_logprob_f64(x_t, eps, x_prev, t, num_steps, eta)
        assert log_prob.shape == (3,)
        torch.testing.assert_close(log_prob.double(), expected, rtol=1e-4, atol=1e-4)
        # with z ~ N(0, I) the mean-reduced density is about -0.5 - log(std) - log sqrt(2 pi)
        assert torch.isfinite(log_prob).all()


def test_passed_prev_sample_is_returned_and_scored():
    """(c) A given prev_sample comes back unchanged; its score depends on where it lies."""
    scheduler = make_scheduler()
    x_t = torch.randn(2, 4, 8, 8)
    eps = torch.randn(2, 4, 8, 8)
    t = scheduler.timesteps[0].item()
    mean = scheduler.step(eps, t, x_t, eta=1.0, variance_noise=torch.zeros_like(x_t)).prev_sample
    far = mean + 1.0
    out, lp_far = ddim_step_with_logprob(scheduler, eps, t, x_t, prev_sample=far)
    assert out is far
    _, lp_mean = ddim_step_with_logprob(scheduler, eps, t, x_t, prev_sample=mean)
    assert (lp_mean > lp_far).all()


def test_batched_timesteps_equal_one_at_a_time():
    """The trainer scores several timesteps in one batch; that equals scoring each alone."""
    scheduler = make_scheduler()
    steps = first_middle_last(scheduler)
    x_t = torch.randn(3, 4, 8, 8)
    eps = torch.randn(3, 4, 8, 8)
    x_prev = torch.randn(3, 4, 8, 8)
    _, batched = ddim_step_with_logprob(
        scheduler, eps, torch.tensor(steps), x_t, prev_sample=x_prev
    )
    for i, t in enumerate(steps):
        _, single = ddim_step_with_logprob(
            scheduler, eps[i : i + 1], t, x_t[i : i + 1], prev_sample=x_prev[i : i + 1]
        )
        torch.testing.assert_close(batched[i : i + 1], single)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_prediction_types_match_diffusers(prediction_type):
    scheduler = make_scheduler(prediction_type=prediction_type, clip_sample=True)
    x_t = torch.randn(2, 4, 8, 8)
    out = torch.randn(2, 4, 8, 8)
    for t in first_middle_last(scheduler):
        z = torch.randn_like(x_t)
        theirs = scheduler.step(out, t, x_t, eta=1.0, variance_noise=z).prev_sample
        mean = scheduler.step(out, t, x_t, eta=1.0, variance_noise=torch.zeros_like(z)).prev_sample
        _, lp_theirs = ddim_step_with_logprob(scheduler, out, t, x_t, prev_sample=theirs)
        _, lp_mean = ddim_step_with_logprob(scheduler, out, t, x_t, prev_sample=mean)
        # at the mean the density is the maximum; the quadratic term of a draw is ~ z^2 / 2
        quad = (lp_mean - lp_theirs).double()
        torch.testing.assert_close(
            quad, (z.double() ** 2 / 2).flatten(1).mean(1), rtol=1e-3, atol=1e-4
        )


def test_eta_zero_has_no_logprob():
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(
            scheduler, torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 4, 8, 8), eta=0
        )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_target_and_deterministic_step_match_diffusers(prediction_type):
    """The log-prob-free algorithms' pieces, held to diffusers: x0_hat is DDIMScheduler.step's
    pred_original_sample, the v target is its get_velocity, and the eta = 0 step is its step."""
    from ddpo_lite.samplers.ddim import DDIMSampler

    scheduler = make_scheduler(10, prediction_type=prediction_type)
    sampler = DDIMSampler(scheduler, eta=0.0)
    gen = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    for t in first_middle_last(scheduler):
        theirs = scheduler.step(out, t, x_t, eta=0.0)
        ts = torch.tensor([t, t])
        torch.testing.assert_close(sampler.predict_x0(out, ts, x_t), theirs.pred_original_sample)
        torch.testing.assert_close(sampler.advance(out, ts, x_t), theirs.prev_sample)
        x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
        expected = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, ts)
        torch.testing.assert_close(sampler.target(x0, noise, ts), expected)
        a = scheduler.alphas_cumprod[t]
        torch.testing.assert_close(sampler.noise_level(ts), (1 - a).sqrt().repeat(2))
