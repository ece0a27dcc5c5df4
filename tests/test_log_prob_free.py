"""The log-prob-free algorithms (DiffusionNFT, AWM): no trajectory kept, the right direction of
learning, a run on every family, and their memory in the estimate.

The losses themselves are held to hand-computed values in tests/test_algorithms.py and the
sampler's x0 / target / deterministic step to diffusers in tests/test_sampling.py.
"""

import numpy as np
import pytest
import torch
from conftest import tiny_config

from ddpo_lite.config import ConfigError
from ddpo_lite.sampling import rollout
from ddpo_lite.trainer import build_components, make_accelerator, sample_epoch, train
from ddpo_lite.update import update


def _run(tmp_path, *overrides):
    config = tiny_config(tmp_path, "sample.num_steps=4", "log_with=[]", *overrides)
    accelerator = make_accelerator(config)
    return config, accelerator, build_components(config, accelerator)


@pytest.mark.parametrize("algorithm", ["nft", "awm"])
def test_the_epoch_keeps_no_chain(tmp_path, algorithm):
    """Only the final latents are kept (B, 1, C, H, W), no log-prob, and they are the final
    latents a recording rollout draws from the same generator (the same samples)."""
    config, accelerator, run = _run(tmp_path, f"train.algorithm='{algorithm}'")
    reward = lambda images, prompts, meta: (np.zeros(len(images)), {})  # noqa: E731
    samples = sample_epoch(
        run, config.prompts.prompts, config, torch.Generator().manual_seed(0), accelerator, reward
    )
    chain = samples.trajectory.chain
    assert chain.shape == (16, 1, 4, 16, 16) and samples.trajectory.log_probs.shape == (16, 0)

    config.train.algorithm = "ddpo-is"
    recorded = sample_epoch(
        run, config.prompts.prompts, config, torch.Generator().manual_seed(0), accelerator, reward
    )
    assert recorded.trajectory.chain.shape == (16, 5, 4, 16, 16)
    torch.testing.assert_close(chain[:, 0], recorded.trajectory.chain[:, -1], rtol=0, atol=0)


@pytest.mark.parametrize("algorithm", ["nft", "awm"])
def test_an_update_pulls_towards_good_samples_and_away_from_bad(tmp_path, algorithm):
    """After three steps with advantage +1 for half the samples and -1 for the rest, the model
    denoises the +1 samples better than the -1 ones (fixed noise, same timesteps); a flipped
    sign would reverse it."""
    config, accelerator, run = _run(
        tmp_path, f"train.algorithm='{algorithm}'", "train.learning_rate=3e-3"
    )
    ids = torch.arange(4) % 4
    texts = [config.prompts.prompts[i] for i in ids]
    _, traj = rollout(run.policy, texts, ids, torch.Generator().manual_seed(0), record=False)
    weights = torch.tensor([1.0, -1.0, 1.0, -1.0])
    sampler = run.policy.sampler

    @torch.no_grad()
    def errors():
        x0 = traj.chain[:, -1].repeat_interleave(4, 0)
        t = traj.timesteps.flatten()
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
        x_t = sampler.add_noise(x0, noise, t)
        out = run.policy.predict(x_t, t, traj.cond.repeat_interleave(4), None)
        mse = ((out - sampler.target(x0, noise, t)) ** 2).flatten(1).mean(1)
        return mse.view(4, 4).mean(1)

    before = errors()
    for seed in range(3):
        update(
            accelerator,
            run.policy,
            run.model,
            run.optimizer,
            run.params,
            traj,
            weights,
            torch.ones(4, dtype=torch.bool),
            config,
            torch.Generator().manual_seed(seed),
        )
    change = errors() - before
    accelerator.end_training()
    # every sample shares the model's improvement on samples alike (a random tiny model draws
    # similar ones); the advantage's sign decides which improve more: +1 ones more than -1 ones
    good, bad = change[weights > 0], change[weights < 0]
    assert good.max() < bad.min(), change


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
@pytest.mark.parametrize("algorithm", ["nft", "awm"])
def test_two_epochs_on_every_family(tmp_path, model, algorithm):
    config = tiny_config(
        tmp_path,
        f'model.name="{model}"',
        f"train.algorithm='{algorithm}'",
        "sample.eta=0",  # a deterministic sampler: allowed without a log-prob
        "num_epochs=2",
        "sample.num_steps=3",
        "sample.num_batches_per_epoch=1",
        "log_with=[]",
    )
    result = train(config, show_progress=False)
    assert [row["epoch"] for row in result.metrics] == [1, 2]
    assert all(np.isfinite(row["loss"]) for row in result.metrics)
    assert "kl_to_base" not in result.metrics[0]  # no trajectory to measure it on
    lora = [p for n, p in result.pipeline.unet.named_parameters() if "lora_B" in n]
    assert all(torch.isfinite(p).all() for p in lora)
    assert sum(float(p.detach().abs().sum()) for p in lora) > 0


def test_settings_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="group_size"):
        tiny_config(tmp_path, "sample.eta=0", "sample.group_size=2", "train.algorithm='nft'")
    with pytest.raises(ConfigError, match="num_inner_epochs"):
        tiny_config(tmp_path, "train.algorithm='awm'", "train.num_inner_epochs=2")
    with pytest.raises(ConfigError, match="eta"):
        tiny_config(tmp_path, "sample.eta=0", "train.algorithm='ddpo-is'")


def test_the_estimate_drops_the_chain_for_nft():
    from ddpo_lite.bench.estimate import estimate
    from ddpo_lite.config import load_config

    ddpo = estimate(load_config("aesthetic"))
    nft = estimate(load_config("aesthetic", ["train.algorithm='nft'", "sample.eta=0"]))
    held = "trajectory (epoch)"
    # 256 x 51 latents against 256 final latents (the prompt embeddings stay in both)
    assert ddpo.phases["training"].parts[held] > 10 * nft.phases["training"].parts[held]
    assert nft.peak_bytes < ddpo.peak_bytes


def test_dpm_solver_samples_as_diffusers_and_nft_trains_on_it(tmp_path):
    """sample.sampler = 'dpm-solver': the rollout's final latents are the diffusers pipeline's
    own with DPMSolverMultistepScheduler from the same noise (twice in a row: the multistep
    history is reset per rollout), NFT trains on them, and a log-prob algorithm is refused."""
    from diffusers import DPMSolverMultistepScheduler

    from ddpo_lite.samplers.dpm import DPMSolverSampler

    config, _, run = _run(
        tmp_path, "train.algorithm='nft'", "sample.sampler='dpm-solver'", "sample.num_steps=5"
    )
    assert isinstance(run.policy.sampler, DPMSolverSampler)
    prompts = ["a cat", "a dog"]
    for _ in range(2):
        _, trajectory = rollout(
            run.policy, prompts, torch.arange(2), torch.Generator().manual_seed(0), record=False
        )
    assert trajectory.chain.shape[1] == 1 and trajectory.log_probs.shape == (2, 0)
    pipe = run.pipe
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    theirs = pipe(
        prompts,
        num_inference_steps=5,
        guidance_scale=config.sample.guidance_scale,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    torch.testing.assert_close(trajectory.final_latents, theirs.float(), rtol=1e-5, atol=1e-5)

    result = train(
        tiny_config(
            tmp_path / "nft",
            "train.algorithm='nft'",
            "sample.sampler='dpm-solver'",
            "sample.num_steps=4",
            "num_epochs=1",
            "sample.num_batches_per_epoch=1",
            "log_with=[]",
        ),
        show_progress=False,
    )
    assert np.isfinite(result.metrics[0]["loss"])
    with pytest.raises(ConfigError, match="dpm-solver"):
        tiny_config(tmp_path, "sample.sampler='dpm-solver'")  # ddpo-is needs the DDIM policy
    with pytest.raises(ConfigError, match="identical"):
        tiny_config(tmp_path, "sample.sampler='dpm-solver'", "train.algorithm='nft'",
                    "sample.group_size=2")  # fmt: skip
