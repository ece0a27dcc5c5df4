"""The flow-matching policy (samplers/flow_sde.py) and GRPO, against independent references.

- noise level 0: the step is diffusers' own `FlowMatchEulerDiscreteScheduler.step`;
- the log-density of a given next sample equals a float64 computation written here, from the
  papers' formulas, not from the module;
- the SDE and CPS keep the marginals of the flow they replace: on Gaussian data the exact
  velocity is known in closed form, and 20,000 SDE paths end with the data's variance;
- sigma = 1 (the first step) and the last step give no NaN; CPS's last step is deterministic;
- on `tiny-sd3`: the deterministic rollout is StableDiffusion3Pipeline's own output, and the
  on-policy ratio is 1 through the update's scoring, in float32 and under bf16 autocast;
- GRPO's group-normalised advantage by hand; an SDE window records and trains only its steps.
"""

import math

import pytest
import torch
from conftest import tiny_config
from diffusers import FlowMatchEulerDiscreteScheduler

from ddpo_lite.advantages import group_normalised_advantages
from ddpo_lite.config import ConfigError
from ddpo_lite.samplers.flow_sde import FlowSDESampler, flow_kl, flow_mean_std
from ddpo_lite.sampling import rollout
from ddpo_lite.trainer import build_components, make_accelerator
from ddpo_lite.update import score_log_probs


def _scheduler(num_steps: int = 10, shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_noise_level_zero_is_the_schedulers_euler_step(kind):
    scheduler = _scheduler()
    gen = torch.Generator().manual_seed(0)
    for i, t in enumerate(scheduler.timesteps):
        x = torch.randn(2, 4, 8, 8, generator=gen)
        v = torch.randn(2, 4, 8, 8, generator=gen)
        scheduler._step_index = i
        theirs = scheduler.step(v, t, x, return_dict=False)[0]
        mean, std = flow_mean_std(scheduler.sigmas, v, torch.tensor(i), x, 0.0, kind)
        torch.testing.assert_close(mean, theirs, rtol=1e-5, atol=1e-6)
        assert float(std.abs().max()) == 0.0
        # and a small noise level moves the mean only a little (continuity at a -> 0)
        near, _ = flow_mean_std(scheduler.sigmas, v, torch.tensor(i), x, 1e-4, kind)
        assert float((near - theirs).abs().max()) < 1e-3


def _reference_log_density(kind, sigmas, i, x, v, x_next, a):
    """log N(x_next; mean, std^2) averaged over elements, in float64, from Flow-GRPO eq. 9 and
    CPS as their papers write them (written out here, independently of the module)."""
    x, v, x_next = x.double(), v.double(), x_next.double()
    t, s = float(sigmas[i]), float(sigmas[i + 1])
    dt = s - t
    if kind == "sde":
        denominator = 1 - (float(sigmas[1]) if t >= 1 else t)
        sigma_t = a * math.sqrt(t / denominator)
        drift = v + sigma_t**2 / (2 * t) * (x + (1 - t) * v)
        mean, std = x + drift * dt, sigma_t * math.sqrt(-dt)
    else:
        std = s * math.sin(a * math.pi / 2)
        x0, eps = x - t * v, x + (1 - t) * v
        mean = (1 - s) * x0 + math.sqrt(s**2 - std**2) * eps
    density = -((x_next - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return density.flatten(1).mean(1)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_log_density_matches_a_float64_reference(kind):
    scheduler = _scheduler(num_steps=8)
    sampler = FlowSDESampler(scheduler, eta=0.7, kind=kind)
    gen = torch.Generator().manual_seed(1)
    for i in sampler.stochastic_steps():
        x = torch.randn(3, 4, 8, 8, generator=gen)
        v = torch.randn(3, 4, 8, 8, generator=gen)
        step = torch.full((3,), i)
        x_next, log_prob = sampler.step(v, step, x, generator=gen)
        reference = _reference_log_density(kind, scheduler.sigmas, i, x, v, x_next, 0.7)
        torch.testing.assert_close(log_prob.double(), reference, rtol=1e-5, atol=1e-4)
        assert torch.isfinite(log_prob).all()
        # the density of a given sample is what the update recomputes
        _, again = sampler.step(v, step, x, prev_sample=x_next)
        torch.testing.assert_close(again, log_prob)


def test_first_and_last_steps_give_no_nan():
    scheduler = _scheduler(num_steps=4)
    assert float(scheduler.sigmas[0]) == 1.0 and float(scheduler.sigmas[-1]) == 0.0
    x, v = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    sde = FlowSDESampler(scheduler, eta=1.0, kind="sde")
    assert sde.stochastic_steps() == [0, 1, 2, 3]
    for i in (0, 3):
        x_next, log_prob = sde.step(v, torch.tensor(i), x)
        assert torch.isfinite(x_next).all() and torch.isfinite(log_prob).all()
    cps = FlowSDESampler(scheduler, eta=1.0, kind="cps")
    assert cps.stochastic_steps() == [0, 1, 2]  # s = 0: std 0, no density
    with pytest.raises(ValueError, match="deterministic"):
        cps.step(v, torch.tensor(3), x)
    # the deterministic last step lands on x0_hat = x - t v exactly
    torch.testing.assert_close(cps.advance(v, torch.tensor(3), x), x - scheduler.sigmas[3] * v)


def test_the_sde_keeps_the_flows_marginals():
    """Data x0 ~ N(0, c^2): x_t = (1 - t) x0 + t eps has variance (1 - t)^2 c^2 + t^2 and the
    exact velocity E[eps - x0 | x_t] = (t - (1 - t) c^2) / var_t * x_t. Paths of the SDE with
    that velocity, from x_1 ~ N(0, 1), end with variance c^2 (as the ODE's do): the stochastic
    step changes the paths, not the distribution. A wrong drift term (its sign, the 1/2t)
    misses by far more than the tolerance. (CPS does not pass this: its per-step noise is a
    fixed fraction of s, not O(sqrt(dt)), and with the posterior-mean x0_hat of a real model
    the paths lose variance (0.166 for 0.25 here); it keeps the coefficients, next test.)"""
    c2, n = 0.25, 20000
    scheduler = _scheduler(num_steps=60, shift=1.0)
    sigmas = scheduler.sigmas.double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    for i in range(60):
        t = float(sigmas[i])
        velocity = (t - (1 - t) * c2) / ((1 - t) ** 2 * c2 + t**2) * x
        mean, std = flow_mean_std(sigmas, velocity, torch.tensor(i), x, 0.7, "sde")
        x = mean.double() + std.double() * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    assert abs(float(x.var()) - c2) < 0.02, float(x.var())
    assert abs(float(x.mean())) < 0.02


def test_cps_preserves_the_coefficients():
    """CPS's claim: given the true x0 and eps of x_t (the oracle velocity v = eps - x0), the
    next sample is (1 - s) x0 + s * (unit Gaussian noise), i.e. distributed as the forward
    process q(x_s | x0): mean (1 - s) x0 + sqrt(s^2 - std^2) eps, and total noise variance s^2."""
    scheduler = _scheduler(num_steps=5)
    sampler = FlowSDESampler(scheduler, eta=0.8, kind="cps")
    gen = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(1, 20000, generator=gen), torch.randn(1, 20000, generator=gen)
    for i in sampler.stochastic_steps():
        t, s = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
        x_t = (1 - t) * x0 + t * eps
        x_s = sampler.advance(eps - x0, torch.tensor(i), x_t, generator=gen)
        residual = (x_s - (1 - s) * x0).double()
        assert abs(float(residual.var()) - s**2) < 0.03 * s**2 + 1e-4
        std = s * math.sin(0.8 * math.pi / 2)
        mean_part = math.sqrt(s**2 - std**2) * eps.double()
        assert abs(float((residual - mean_part).var()) - std**2) < 0.03 * std**2


def test_kl_is_the_closed_form_of_two_gaussians():
    scheduler = _scheduler(num_steps=6)
    x, v1, v2 = (torch.randn(2, 4, 4, 4) for _ in range(3))
    step = torch.tensor(2)
    kl = flow_kl(scheduler.sigmas, v1, v2, step, x, 0.7)
    m1, std = flow_mean_std(scheduler.sigmas, v1, step, x, 0.7)
    m2, _ = flow_mean_std(scheduler.sigmas, v2, step, x, 0.7)
    # KL(N(m1, s^2) || N(m2, s^2)) = (m1 - m2)^2 / (2 s^2), per element
    by_hand = ((m1.double() - m2.double()) ** 2 / (2 * std.double() ** 2)).flatten(1).mean(1)
    torch.testing.assert_close(kl.double(), by_hand, rtol=1e-5, atol=1e-8)
    assert float(flow_kl(scheduler.sigmas, v1, v1, step, x, 0.7).abs().max()) == 0.0


def test_group_normalised_advantages_by_hand():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, 5.0, 5.0, 9.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    adv = group_normalised_advantages(rewards, groups, adv_clip_max=5.0)
    # group 0: mean 2, std 1 -> -1/(1 + 1e-4), +1/(1 + 1e-4); group 1: equal rewards -> 0
    # group 2: mean 6, std sqrt(3) -> (-1, -1, -1, 3) / (sqrt(3) + 1e-4)
    root3 = math.sqrt(3) + 1e-4
    expected = [-1 / 1.0001, 1 / 1.0001, 0, 0, -1 / root3, -1 / root3, -1 / root3, 3 / root3]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    clipped = group_normalised_advantages(rewards, groups, adv_clip_max=1.5)
    assert float(clipped.max()) == 1.5


def _sd3_run(tmp_path, *overrides):
    config = tiny_config(
        tmp_path, 'model.name="tiny-sd3"', "log_with=[]", "sample.num_steps=6", *overrides
    )
    accelerator = make_accelerator(config)
    return config, build_components(config, accelerator)


def test_sd3_deterministic_rollout_is_the_pipelines_output(tmp_path):
    """eta 0 is the ODE: our rollout's final latents are StableDiffusion3Pipeline's own (its
    encode_prompt with no T5, CFG with the empty negative, the Euler steps on its shifted
    sigmas) from the same initial noise."""
    config, run = _sd3_run(tmp_path, "sample.eta=0.0", "train.algorithm='nft'")
    assert run.policy.family.name == "sd3" and run.policy.guided
    prompts = ["a cat", "a dog"]
    _, trajectory = rollout(
        run.policy, prompts, torch.arange(2), torch.Generator().manual_seed(0), record=False
    )
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    theirs = run.pipe(
        prompts,
        num_inference_steps=6,
        guidance_scale=config.sample.guidance_scale,
        latents=noise,
        output_type="latent",
        height=32,
        width=32,
    ).images
    assert theirs.abs().max() > 0.5
    torch.testing.assert_close(trajectory.final_latents, theirs.float(), rtol=1e-5, atol=1e-5)


HALF = ["memory.mixed_precision='bf16'", "memory.half_base=true"]


@pytest.mark.parametrize("kind", ["sde", "cps"])
@pytest.mark.parametrize("overrides", [[], HALF], ids=["fp32", "bf16"])
def test_sd3_on_policy_ratio_is_one(tmp_path, kind, overrides):
    config, run = _sd3_run(
        tmp_path, "sample.eta=0.7", f"sample.flow_sampler='{kind}'", "train.kl_coef=0.1", *overrides
    )
    ids = torch.arange(4) % 4
    texts = [config.prompts.prompts[i] for i in ids]
    _, trajectory = rollout(run.policy, texts, ids, torch.Generator().manual_seed(0))
    steps = 5 if kind == "cps" else 6  # CPS's last step is deterministic and not kept
    assert trajectory.log_probs.shape == (4, steps)
    assert (trajectory.final is not None) == (kind == "cps")
    run.model.train()
    batch = trajectory.index(torch.tensor([2, 0]))  # a train batch unlike the sampling batch
    cols = torch.tensor([[4, 0, 3], [1, 2, 0]])
    with torch.enable_grad():
        new, kl = score_log_probs(run.policy, run.model, batch, cols, kl_coef=0.1)
    old = batch.log_probs[torch.arange(2)[:, None], cols]
    # measured: <= 5e-7 on-policy; latents stored in bf16 move it 1.6e-4 to 3e-2
    assert (torch.exp(new - old) - 1).abs().max() < 1e-5
    assert float(kl.detach().abs().max()) < 1e-10  # the LoRA starts at zero: policy == base
    lossy = batch.index(torch.arange(2))  # and the check can fail: latents stored in bf16
    lossy.chain = lossy.chain.bfloat16().float()
    with torch.enable_grad():
        new_lossy = score_log_probs(run.policy, run.model, lossy, cols)
    assert (torch.exp(new_lossy - old) - 1).abs().max() > 5e-5


def test_an_sde_window_records_only_its_steps(tmp_path):
    config, run = _sd3_run(tmp_path, "sample.eta=0.7")
    prompts = ["a cat", "a dog"]
    gen = torch.Generator().manual_seed(3)
    _, windowed = rollout(run.policy, prompts, torch.arange(2), gen, window=range(2, 4))
    assert windowed.chain.shape[:2] == (2, 3) and windowed.timesteps[0].tolist() == [2, 3]
    assert windowed.final is not None and windowed.log_probs.shape == (2, 2)
    # the steps before the window are the ODE: the window starts where the ODE is after 2 steps
    ode = FlowSDESampler(run.policy.sampler.scheduler, eta=0.0)
    from dataclasses import replace

    _, deterministic = rollout(
        replace(run.policy, sampler=ode),
        prompts,
        torch.arange(2),
        torch.Generator().manual_seed(3),
        record=False,
    )
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    x = noise
    cond, negative = run.policy.encoder(prompts)
    for i in range(2):
        x = ode.advance(run.policy.predict(x, torch.tensor(i), cond, negative), i, x)
    torch.testing.assert_close(windowed.chain[:, 0], x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(windowed.final, deterministic.final_latents, atol=1e-3)
    # a window that ends at the last step still keeps x0 apart (batches must concatenate)
    _, at_end = rollout(run.policy, prompts, torch.arange(2), gen, window=range(4, 6))
    from ddpo_lite.sampling import Trajectory

    both = Trajectory.cat([windowed, at_end])
    assert both.final_latents.shape == (4, 4, 16, 16)
    torch.testing.assert_close(at_end.final, at_end.chain[:, -1])


def test_grpo_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="group_size >= 2"):
        tiny_config(tmp_path, "train.algorithm='grpo'")
    with pytest.raises(ConfigError, match="sde_window_size"):
        tiny_config(tmp_path, "train.algorithm='nft'", "sample.sde_window_size=2")
    with pytest.raises(ConfigError, match="sde_window_range"):
        tiny_config(
            tmp_path, "sample.num_steps=5", "sample.sde_window_size=3", "sample.sde_window_range=4"
        )
    with pytest.raises(ConfigError, match="flow_sampler"):
        tiny_config(tmp_path, "sample.flow_sampler='euler'")


def test_sd3_bad_input_is_one_line_at_setup(tmp_path):
    from ddpo_lite.families import family_of
    from ddpo_lite.models import load_pipeline
    from ddpo_lite.trainer import check_family_settings

    pipe = load_pipeline("tiny-sd3")
    config = tiny_config(tmp_path, 'model.name="tiny-sd3"')
    check_family_settings(pipe, family_of(pipe), config, 32)
    with pytest.raises(ConfigError, match="not a multiple of 4.*patch size"):
        check_family_settings(pipe, family_of(pipe), config, 30)
    with pytest.raises(ConfigError, match="flow models"):
        config = tiny_config(tmp_path, "sample.flow_sampler='cps'", "log_with=[]")
        build_components(config, make_accelerator(config))


def test_sd3_encodes_the_configured_t5_tokens(tmp_path):
    """model.max_sequence_length sets T5's tokens after the CLIPs' 77 (tiny-sd3 has no T5: the
    pipeline's zeros in its place), the negative prompt's too; -1 is the pipeline's 256."""
    for setting, t5 in ((-1, 256), (16, 16), (0, 0)):
        _, run = _sd3_run(tmp_path, f"model.max_sequence_length={setting}")
        assert run.policy.encoder.max_sequence_length == t5
        cond, negative = run.policy.encoder(["a cat", "a dog"])
        assert cond["prompt_embeds"].shape[:2] == (2, 77 + t5)
        assert negative["prompt_embeds"].shape[:2] == (1, 77 + t5)


def test_text_tokens_bad_input_is_one_line_at_setup(tmp_path, capsys):
    """A length the family cannot take: on an SD 1.x model (CLIP only), from the command line
    in one line; above T5's 512 on SD3 (StableDiffusion3Pipeline would refuse it only when
    sampling)."""
    from ddpo_lite.cli import main

    args = ["train", "--preset", "tiny", "--output", str(tmp_path / "run"), "--quiet"]
    sets = ["--set", "log_with=[]", "--set", "model.max_sequence_length=128"]
    assert main([*args, *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert "max_sequence_length = 128" in err and "sd1" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match=r"outside \[0, 512\].*refuses more than 512"):
        _sd3_run(tmp_path, "model.max_sequence_length=513")
    _sd3_run(tmp_path, "model.max_sequence_length=512")  # and at the limit it runs


def test_sd3_grpo_trains_resumes_and_its_lora_loads_in_diffusers(tmp_path):
    """Flow-GRPO on tiny-sd3 through the command line: train, resume, the LoRA loads in a plain
    StableDiffusion3Pipeline (every tensor, under `transformer.`) and changes its images;
    `sample` and `eval` run on it."""
    import json

    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    from ddpo_lite.cli import main
    from ddpo_lite.models.lora import read_lora_metadata
    from ddpo_lite.models.tiny_sd3 import tiny_sd3_pipeline_dir

    out = tmp_path / "run"
    sets = [
        "model.name=tiny-sd3",
        "num_epochs=2",
        "sample.num_steps=4",
        "sample.eta=0.7",
        "sample.group_size=4",
        "sample.same_initial_noise=false",
        "sample.sde_window_size=2",
        "sample.sde_window_range=2",
        "train.algorithm=grpo",
        "train.kl_coef=0.04",
        "log_with=[]",
    ]
    args = ["train", "--preset", "tiny", "--output", str(out), "--quiet", "--export", "kohya"]
    assert main([*args, *(x for s in sets for x in ("--set", s))]) == 0
    comfy = load_file(out / "lora_comfyui.safetensors")  # kohya names do not apply to SD3
    assert comfy and all(k.startswith("transformer.") for k in comfy)
    assert main(["train", "--resume", str(out), "--quiet", "--set", "num_epochs=3"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert all(row["kl_penalty"] >= 0 for row in rows) and rows[-1]["kl_to_base"] > 0
    meta = read_lora_metadata(out / "lora")
    assert meta["family"] == "sd3" and meta["base_model"] == "tiny-sd3:0"

    pipe = StableDiffusion3Pipeline.from_pretrained(
        tiny_sd3_pipeline_dir(), text_encoder_3=None, tokenizer_3=None
    )
    pipe.set_progress_bar_config(disable=True)

    def image():
        generator = torch.Generator().manual_seed(0)
        return pipe("a cat", num_inference_steps=3, generator=generator, output_type="pt").images

    before = image()
    pipe.load_lora_weights(str(out / "lora"))
    saved = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert saved and all(k.startswith("transformer.") for k in saved)
    loaded = [n for n, _ in pipe.transformer.named_parameters() if "lora_" in n]
    assert len(loaded) == len(saved)
    assert (image() - before).abs().max() > 1e-4

    shots = tmp_path / "shots"
    assert main(["sample", "--lora", str(out / "lora"), "--prompt", "a cat", "--num", "1",
                 "--output", str(shots)]) == 0  # fmt: skip
    assert len(list(shots.glob("*.png"))) >= 1
    prompts = tmp_path / "heldout.txt"
    prompts.write_text("a red fox\n")
    args = ["eval", "--lora", str(out / "lora"), "--prompts", str(prompts), "--num", "1"]
    assert main([*args, "--steps", "2", "--reward", "jpeg_compressibility"]) == 0


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_grpo_runs_on_the_unet_families(tmp_path, model, monkeypatch):
    """GRPO's advantage is family-independent: on SD 1.x and SDXL each group of images gets
    (r - group mean) / (group std + 1e-4), and the update runs with its KL to the base."""
    import ddpo_lite.trainer as trainer_module
    from ddpo_lite.trainer import train

    seen = []
    original = trainer_module.group_normalised_advantages

    def spy(rewards, groups, adv_clip_max):
        adv = original(rewards, groups, adv_clip_max)
        seen.append((rewards.clone(), groups.clone(), adv))
        return adv

    monkeypatch.setattr(trainer_module, "group_normalised_advantages", spy)
    config = tiny_config(
        tmp_path,
        f"model.name={model}",
        "num_epochs=1",
        "sample.num_steps=3",
        "sample.group_size=4",
        "train.algorithm=grpo",
        "train.kl_coef=0.04",
        "log_with=[]",
    )
    result = train(config, show_progress=False)
    rewards, groups, adv = seen[0]
    for group in groups.unique():
        members = groups == group
        r = rewards[members].double()
        expected = (r - r.mean()) / (r.std(correction=0) + 1e-4)
        torch.testing.assert_close(adv[members].double(), expected.clamp(-5, 5), atol=1e-5, rtol=0)
    assert result.metrics[0]["kl_penalty"] >= 0 and math.isfinite(result.metrics[0]["loss"])


@pytest.mark.parametrize(
    ("model", "algorithm"), [("tiny-sd3", "nft"), ("tiny-sd3", "awm"), ("tiny-flux", "nft")]
)
def test_log_prob_free_algorithms_run_on_the_flow_families(tmp_path, model, algorithm):
    """NFT and AWM on flow models: sampled with the pipeline's own Euler ODE (eta 0), the final
    samples noised by the flow's forward process, x0 = x_t - t v and the velocity target; the
    LoRA moves and stays finite."""
    from ddpo_lite.trainer import train

    config = tiny_config(
        tmp_path,
        f"model.name={model}",
        f"train.algorithm={algorithm}",
        "sample.eta=0.0",
        "sample.num_steps=4",
        "sample.guidance_scale=1.0",
        "sample.num_batches_per_epoch=1",
        "num_epochs=1",
        "log_with=[]",
    )
    result = train(config, show_progress=False)
    assert math.isfinite(result.metrics[0]["loss"])
    denoiser = result.pipeline.transformer
    lora = [p for n, p in denoiser.named_parameters() if "lora_B" in n]
    assert lora and all(torch.isfinite(p).all() for p in lora)
    assert sum(float(p.detach().abs().sum()) for p in lora) > 0
