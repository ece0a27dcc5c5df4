"""The update: on-policy log-probs, chunked accumulation, frozen base weights, dropped samples."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

from ddpo_lite.algorithms import ddpo_is_loss
from ddpo_lite.models import load_pipeline
from ddpo_lite.models.lora import read_lora_metadata
from ddpo_lite.sampling import rollout
from ddpo_lite.trainer import build_components, make_accelerator, sample_epoch, score_epoch, train
from ddpo_lite.update import (
    UpdateSettings,
    accumulate_step,
    score_log_probs,
    timestep_columns,
    update,
)

HALF = [
    "memory.mixed_precision='bf16'",
    "memory.half_base=true",
    "memory.gradient_checkpointing=true",
]


def sample_batch(config, accelerator, run, n=4, seed=0):
    prompts = config.prompts.prompts
    ids = torch.arange(n) % len(prompts)
    return rollout(run.policy, [prompts[i] for i in ids], ids, torch.Generator().manual_seed(seed))


def test_rollout_returns_images_and_detached_trajectory(tmp_path):
    config = tiny_config(tmp_path, "sample.num_steps=4")
    accelerator = make_accelerator(config)
    run = build_components(config, accelerator)
    calls = []
    original = run.pipe.encode_prompt
    run.pipe.encode_prompt = lambda *a, **k: calls.append(a[0]) or original(*a, **k)
    images, traj = sample_batch(config, accelerator, run, n=6)
    assert len(images) == 6 and images[0].size == (32, 32)
    assert traj.latents.shape == (6, 4, 4, 16, 16) and traj.log_probs.shape == (6, 4)
    assert traj.latents.dtype == torch.float32 and not traj.latents.requires_grad
    assert not traj.log_probs.requires_grad and traj.log_probs.grad_fn is None
    # the chain is continuous: each step starts where the previous one ended
    torch.testing.assert_close(traj.latents[:, 1:], traj.next_latents[:, :-1], rtol=0, atol=0)
    assert (traj.timesteps[:, 0] > traj.timesteps[:, -1]).all()
    # each distinct prompt is encoded once (4 prompts in the tiny preset), then cached
    sample_batch(config, accelerator, run, n=6, seed=1)
    assert sorted(p for call in calls for p in call) == sorted(config.prompts.prompts)


@pytest.mark.parametrize(
    "overrides",
    [[], HALF, ["sample.guidance_scale=1.0"]],
    ids=["fp32", "bf16-half-base-checkpointing", "cfg-free"],
)
def test_on_policy_ratio_is_one(tmp_path, overrides):
    """The classic silent DDPO bug: re-scoring a stored trajectory with the unchanged policy in
    the training configuration (train mode, same CFG, autocast, checkpointing, a different batch
    composition and timestep chunks) must give back the stored log-probs."""
    config = tiny_config(tmp_path, "sample.num_steps=8", *overrides)
    accelerator = make_accelerator(config)
    run = build_components(config, accelerator)
    _, traj = sample_batch(config, accelerator, run, n=4)

    run.model.train()
    with torch.enable_grad():
        first = traj.index(torch.tensor([2, 0]))  # a train batch unlike the sampling batch
        cols = torch.tensor([[7, 0, 3], [1, 5, 6]])  # the first (0) and last (7) steps included
        new = score_log_probs(run.policy, run.model, first, cols)
        old = first.log_probs[torch.arange(2)[:, None], cols]
        ratio = torch.exp(new - old)
        assert (ratio - 1).abs().max() < 1e-3
        # the paper's clip range: nothing of the first minibatch is clipped
        _, stats = ddpo_is_loss(new, old, torch.ones_like(new), clip_range=1e-4)
        assert stats["clipfrac"] == 0

        # and the check can fail: latents stored in half precision break it
        lossy = first.index(torch.arange(2))
        lossy.chain = lossy.chain.half().float()
        new_lossy = score_log_probs(run.policy, run.model, lossy, cols)
        assert (torch.exp(new_lossy - old) - 1).abs().max() > 1e-3


def test_on_policy_ratio_is_one_with_compiled_blocks(tmp_path):
    """memory.compile_blocks (regional torch.compile, inductor): the compiled attention blocks,
    LoRA inside, re-score a stored trajectory within 1e-4 in another batch composition."""
    config = tiny_config(tmp_path, "sample.num_steps=3", "memory.compile_blocks=true")
    accelerator = make_accelerator(config)
    run = build_components(config, accelerator)
    blocks = [m for m in run.denoiser.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    _, traj = sample_batch(config, accelerator, run, n=3)
    run.model.train()
    with torch.enable_grad():
        first = traj.index(torch.tensor([2, 0]))
        cols = torch.tensor([[2, 0], [1, 2]])
        new = score_log_probs(run.policy, run.model, first, cols)
        new.sum().backward()  # the compiled backward runs too
    old = first.log_probs[torch.arange(2)[:, None], cols]
    assert (torch.exp(new.detach() - old) - 1).abs().max() < 1e-4
    assert all(p.grad is not None for p in run.params)


@pytest.mark.parametrize("algorithm", ["ddpo-is", "ddpo-sf"])
def test_chunked_gradient_equals_unchunked(tmp_path, algorithm):
    """Accumulating micro-batches of 1 sample and chunks of 1, 2, 3 and all timesteps over two
    train batches gives the gradient of the step's mean loss computed in one forward (float32,
    rtol 1e-4)."""
    config = tiny_config(tmp_path, "sample.num_steps=6", f"train.algorithm='{algorithm}'")
    accelerator = make_accelerator(config)
    run = build_components(config, accelerator)
    # give the LoRA a non-zero B so that every LoRA weight gets a gradient
    gen = torch.Generator().manual_seed(0)
    for name, p in run.denoiser.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    _, traj = sample_batch(config, accelerator, run, n=3)
    weights = torch.tensor([1.5, -0.7, 0.4])
    valid = torch.ones(3, dtype=torch.bool)
    cols = torch.stack([torch.randperm(6, generator=gen)[:5] for _ in range(3)])  # (3, 5)
    settings = UpdateSettings(algorithm, clip_range=0.2)
    batches = [  # two train batches, of 1 and 2 samples, accumulated into one optimizer step
        (traj.index(torch.tensor([0])), cols[:1], weights[:1], valid[:1]),
        (traj.index(torch.tensor([1, 2])), cols[1:], weights[1:], valid[1:]),
    ]

    # reference: one forward over all 15 (sample, timestep) pairs, mean loss
    run.optimizer.zero_grad(set_to_none=True)
    new = score_log_probs(run.policy, run.model, traj, cols)
    old = traj.log_probs[torch.arange(3)[:, None], cols]
    adv = weights[:, None].expand_as(new)
    loss = ddpo_is_loss(new, old, adv, 0.2)[0] if algorithm == "ddpo-is" else (-adv * new).sum()
    (loss / cols.numel()).backward()
    reference = [p.grad.clone() for p in run.params]
    assert all(g.abs().sum() > 0 for g in reference)

    # (micro-batch, timestep chunk): 0 = whole; the second batch has 2 samples to split
    for micro, chunk in ((0, 1), (0, 3), (0, 0), (1, 0), (1, 2)):
        run.optimizer.zero_grad(set_to_none=True)
        accumulate_step(
            accelerator, run.policy, run.model, batches, settings, chunk, micro_batch=micro
        )
        for p, ref in zip(run.params, reference, strict=True):
            # float32 summation order differs between chunkings: compare at 1e-4 of the scale
            torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short half-precision run shared by the tests below: bf16 autocast, bf16 frozen
    weights, gradient checkpointing, two epochs."""
    tmp = tmp_path_factory.mktemp("trained")
    config = tiny_config(
        tmp,
        *HALF,
        "num_epochs=2",
        "sample.num_steps=4",
        "sample.num_batches_per_epoch=1",
        "train.learning_rate=1e-2",
    )
    return config, train(config)


@pytest.mark.xdist_group("trained")  # one worker builds the module fixture
def test_only_lora_parameters_move(trained):
    """After training every base UNet, VAE and text-encoder weight is bit-identical to the
    loaded model's (cast to the frozen dtype); the LoRA's B matrices left their zero init."""
    config, result = trained
    fresh = load_pipeline("tiny")
    pipe = result.pipeline
    for name in ("unet", "vae", "text_encoder"):
        before = {k: v.to(torch.bfloat16) for k, v in getattr(fresh, name).state_dict().items()}
        after = getattr(pipe, name).state_dict()
        base = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
        assert base.keys() == before.keys()
        for key, value in before.items():
            assert torch.equal(base[key], value), f"{name}.{key} changed"
    lora_b = [v for k, v in pipe.unet.state_dict().items() if "lora_B" in k]
    assert lora_b and all(v.dtype == torch.float32 for v in lora_b)
    assert sum(float(v.abs().sum()) for v in lora_b) > 0


@pytest.mark.xdist_group("trained")  # one worker builds the module fixture
def test_run_outputs_and_metrics(trained):
    config, result = trained
    assert len(result.metrics) == 2
    lines = (result.output_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    for key in ("reward_mean", "approx_kl", "clipfrac", "loss", "grad_norm", "dropped_samples"):
        assert key in result.metrics[0] and math.isfinite(result.metrics[0][key])
    assert (result.output_dir / "config.toml").is_file()
    grids = sorted(p.name for p in (result.output_dir / "samples").glob("*.png"))
    assert grids == ["epoch_0001.png", "epoch_0002.png"]
    meta = read_lora_metadata(result.lora_dir)
    assert meta["base_model"] == "tiny:0" and meta["rank"] == "4" and meta["epoch"] == "2"


@pytest.mark.xdist_group("trained")  # one worker builds the module fixture
def test_saved_lora_loads_in_plain_diffusers(trained):
    """`load_lora_weights` on a fresh pipeline picks up every trained tensor (so the key prefix
    is right) and changes the UNet's output."""
    _, result = trained
    trained_lora = {k: v for k, v in result.pipeline.unet.state_dict().items() if "lora_" in k}
    pipe = load_pipeline("tiny")
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_out = pipe.unet(x, 500, encoder_hidden_states=emb).sample
        pipe.load_lora_weights(result.lora_dir)
        lora_out = pipe.unet(x, 500, encoder_hidden_states=emb).sample
    loaded = {k: v for k, v in pipe.unet.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(trained_lora) > 0
    for (k_loaded, v_loaded), v_trained in zip(
        sorted(loaded.items()), [v for _, v in sorted(trained_lora.items())], strict=True
    ):
        assert torch.equal(v_loaded.float(), v_trained.float()), k_loaded
    assert (lora_out - base_out).abs().max() > 1e-6


def test_nonfinite_rewards_are_dropped(tmp_path):
    """A NaN or inf reward drops its sample with a warning counted in the metrics; the LoRA
    stays finite and still learns from the other samples."""

    def reward(images, prompts, metadata):
        values = np.arange(len(images), dtype=np.float64)
        values[0], values[3] = np.nan, np.inf
        return values, {}

    config = tiny_config(
        tmp_path, "num_epochs=1", "sample.num_steps=3", "sample.num_batches_per_epoch=1"
    )
    with pytest.warns(UserWarning, match="2 sample"):
        result = train(config, reward_fn=reward)
    assert result.metrics[0]["dropped_samples"] == 2
    assert math.isfinite(result.metrics[0]["loss"])
    lora = [v for k, v in result.pipeline.unet.state_dict().items() if "lora_B" in k]
    assert all(torch.isfinite(v).all() for v in lora)
    assert sum(float(v.abs().sum()) for v in lora) > 0


@pytest.mark.parametrize(
    "algorithm, extra",
    [
        ("ddpo-sf", []),
        ("rwr", []),
        ("rwr", ["train.rwr_weighting='sparse'", "train.rwr_sparse_quantile=0.5"]),
        (
            "ddpo-is",
            ["train.timestep_fraction=0.5", "train.timestep_chunk=1", "train.num_inner_epochs=2"],
        ),
    ],
)
def test_every_algorithm_updates_the_lora(tmp_path, algorithm, extra):
    """The paper's four variants (DDPO-IS, DDPO-SF, RWR, sparse RWR) each run an epoch and move
    the LoRA; the number of optimizer steps follows from the config."""
    config = tiny_config(
        tmp_path,
        f"train.algorithm='{algorithm}'",
        "num_epochs=1",
        "sample.num_steps=4",
        "sample.num_batches_per_epoch=1",
        *extra,
    )
    result = train(config)
    row = result.metrics[0]
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0
    lora_b = [v for k, v in result.pipeline.unet.state_dict().items() if "lora_B" in k]
    assert sum(float(v.abs().sum()) for v in lora_b) > 0


@pytest.mark.parametrize("algorithm", ["ddpo-is", "ddpo-sf"])
def test_an_update_raises_the_log_prob_of_good_samples_and_lowers_bad_ones(tmp_path, algorithm):
    """The direction of learning: one optimizer step with advantages +1/-1 makes the policy's
    log-probability of the +1 trajectories' steps go up and of the -1 ones go down. (At lr 1e-2
    Adam's first sign-sized step is large enough that its second-order term lowers every
    log-prob: the +1 samples then fall least, which this test would not accept.)"""
    config = tiny_config(
        tmp_path,
        "sample.num_steps=4",
        f"train.algorithm='{algorithm}'",
        "train.learning_rate=1e-3",
        "train.clip_range=10.0",
        "train.batch_size=4",
        "train.gradient_accumulation=1",
    )
    accelerator = make_accelerator(config)
    run = build_components(config, accelerator)
    _, traj = sample_batch(config, accelerator, run, n=4)
    weights = torch.tensor([1.0, -1.0, 1.0, -1.0])
    cols = torch.arange(4).repeat(4, 1)

    def log_probs():
        with torch.no_grad():
            return score_log_probs(run.policy, run.model, traj, cols).sum(1)

    before = log_probs()
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
        torch.Generator().manual_seed(0),
    )
    change = log_probs() - before
    accelerator.end_training()
    assert torch.all(change[weights > 0] > 0), change
    assert torch.all(change[weights < 0] < 0), change


def test_groups_share_their_prompt_and_starting_noise(tmp_path):
    """sample.group_size = 2: each pair of images starts from one latent with one prompt, then
    the per-step noise sets them apart; the pairs' advantages are leave-one-out."""
    config = tiny_config(tmp_path, "sample.num_steps=3", "sample.group_size=2")
    accelerator = make_accelerator(config)
    run = build_components(config, accelerator)
    reward = lambda images, prompts, meta: (np.arange(len(images), dtype=float), {})  # noqa: E731
    samples = sample_epoch(
        run, config.prompts.prompts, config, torch.Generator().manual_seed(0), accelerator, reward
    )
    chain, ids = samples.trajectory.chain, samples.trajectory.prompt_ids
    assert len(chain) == 16 and (ids[0::2] == ids[1::2]).all()
    torch.testing.assert_close(chain[0::2, 0], chain[1::2, 0], rtol=0, atol=0)
    assert not torch.equal(chain[0, 0], chain[2, 0])
    assert not torch.equal(chain[0::2, -1], chain[1::2, -1])
    scored = score_epoch(
        samples.rewards, samples.trajectory, config.prompts.prompts, None, config, accelerator
    )
    # rewards 0..15 in pairs (2k, 2k+1): every centred advantage is -1 or +1, std 1
    expected = torch.tensor([-1.0, 1.0]).repeat(8)
    torch.testing.assert_close(scored.weights, expected, rtol=0, atol=1e-5)


def test_timestep_columns_draw_from_the_first_steps():
    """train.first_steps: the trained steps come from the first (noisiest) ones only; the
    fraction applies within that window."""
    g = torch.Generator().manual_seed(0)
    window = timestep_columns(50, 10, 1.0, g, first_steps=4)
    assert window.shape == (50, 4)
    assert (window.sort(dim=1).values == torch.arange(4)).all()
    half = timestep_columns(50, 10, 0.5, g, first_steps=4)
    assert half.shape == (50, 2) and half.max() < 4 and (half[:, 0] != half[:, 1]).all()
    everything = timestep_columns(50, 10, 1.0, g)
    assert (everything.sort(dim=1).values == torch.arange(10)).all()
    assert (
        timestep_columns(5, 10, 1.0, g, first_steps=30).sort(1).values == torch.arange(10)
    ).all()


def test_an_epoch_with_every_sample_dropped_stops_the_run(tmp_path):
    """All rewards NaN: the run stops with an error naming the epoch, writes no LoRA and takes
    no optimizer step (AdamW would move the LoRA on zero gradients by its momentum and decay)."""
    from ddpo_lite.rewards.compose import RewardError

    def reward(images, prompts, metadata):
        return np.full(len(images), np.nan), {}

    config = tiny_config(
        tmp_path, "num_epochs=2", "sample.num_steps=3", "sample.num_batches_per_epoch=1"
    )
    with pytest.raises(RewardError, match="epoch 1: all 8 samples"):
        train(config, reward_fn=reward, show_progress=False)
    assert not (tmp_path / "run" / "lora").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_optimizer_step_with_no_valid_sample_is_skipped(tmp_path):
    config = tiny_config(tmp_path, "sample.num_steps=3", "train.adam_weight_decay=0.1")
    accelerator = make_accelerator(config)
    run = build_components(config, accelerator)
    _, trajectory = sample_batch(config, accelerator, run)
    with torch.no_grad():  # a LoRA that has moved, so that weight decay would change it
        for p in run.params:
            p.add_(0.01)
    before = [p.detach().clone() for p in run.params]
    n = len(trajectory)
    stats = update(
        accelerator,
        run.policy,
        run.model,
        run.optimizer,
        run.params,
        trajectory,
        torch.ones(n),
        torch.zeros(n, dtype=torch.bool),
        config,
        torch.Generator().manual_seed(0),
    )
    assert stats == {}
    assert all(torch.equal(a, b) for a, b in zip(before, run.params, strict=True))
    # the same call with the samples valid does move it (the check above can fail)
    update(
        accelerator,
        run.policy,
        run.model,
        run.optimizer,
        run.params,
        trajectory,
        torch.ones(n),
        torch.ones(n, dtype=torch.bool),
        config,
        torch.Generator().manual_seed(0),
    )
    assert not all(torch.equal(a, b) for a, b in zip(before, run.params, strict=True))


def test_a_scheduler_with_alpha_to_one_is_made_safe():
    """diffusers' DDIM default set_alpha_to_one = True gives the last step std 0 (NaN
    log-prob); the loaded pipeline samples with False, and says so."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from ddpo_lite.models.loading import ddim_scheduler
    from ddpo_lite.sampling import ddim_step_with_logprob

    pipe = load_pipeline("tiny")
    unsafe = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    with pytest.warns(UserWarning, match="set_alpha_to_one"):
        safe = ddim_scheduler(unsafe)
    assert safe.config.set_alpha_to_one is False
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # no such key: DDIM's True
    assert ddim_scheduler(euler).config.set_alpha_to_one is False

    for scheduler, finite in ((unsafe, False), (safe, True)):
        scheduler.set_timesteps(4)
        t = scheduler.timesteps[-1:]
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        _, log_prob = ddim_step_with_logprob(
            scheduler, eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(2)
        )
        assert bool(torch.isfinite(log_prob).all()) is finite


def test_metrics_lines_are_strict_json():
    from ddpo_lite.trainer import json_line

    line = json_line({"epoch": 1, "reward_mean": float("nan"), "kl": float("inf"), "x": 0.5})
    assert line == '{"epoch": 1, "reward_mean": null, "kl": null, "x": 0.5}\n'

    def refuse(name):
        raise ValueError(name)

    assert json.loads(line, parse_constant=refuse)["x"] == 0.5
