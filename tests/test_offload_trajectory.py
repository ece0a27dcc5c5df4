"""memory.offload_trajectory: the epoch's chains in CPU memory, one micro-batch's on the device.

The CPU has no second device to offload to, so the plumbing is checked on PyTorch's meta device
standing in for the accelerator (a value read there raises; copies from the host are counted),
the update's one-micro-batch-at-a-time gathering with weak references on the CPU, and the
estimate against the chain's bytes by arithmetic.
"""

import gc
import math
import weakref

import torch
from conftest import tiny_config
from test_no_device_sync import META, PROMPTS, HostCopies, _meta_policy

from ddpo_lite.bench.estimate import build_meta_models, estimate
from ddpo_lite.sampling import Trajectory, rollout
from ddpo_lite.trainer import build_components, make_accelerator
from ddpo_lite.update import UpdateSettings, accumulate_step, score_log_probs


def test_a_chain_held_on_the_cpu_comes_to_the_device_per_micro_batch(tmp_path, monkeypatch):
    policy = _meta_policy(tmp_path, "tiny", "sample.eta=1.0")
    monkeypatch.setattr(type(policy.family), "decode", lambda self, pipe, latents: [])
    _, trajectory = rollout(policy, PROMPTS, torch.arange(2), torch.Generator().manual_seed(0))
    trajectory.chain = torch.randn(trajectory.chain.shape)  # as sample_epoch's offload holds it
    assert trajectory.device == META

    with HostCopies() as copies:  # (the update's rows come from the device: here the host)
        part = trajectory.index(torch.tensor([1]))
    assert copies.count == 1  # the rows, for the tensors on the device; the chain stays
    assert part.chain.device.type == "cpu" and part.log_probs.device == META
    with HostCopies() as copies:
        assert trajectory.is_finite().shape == (2,)
    assert copies.count == 1  # the chain's (B,) verdict, not the chain

    with HostCopies() as copies:
        here = part.on_device()
    assert copies.count == 1 and here.chain.device == META and here.on_device() is here
    new = score_log_probs(policy, policy.denoiser, here, torch.tensor([[0, 3]], device=META))
    assert new.shape == (1, 2) and new.device == META


def test_the_update_gathers_one_micro_batch_at_a_time(tmp_path, monkeypatch):
    """Micro-batches of 1 over a train batch of 4, 2 timestep chunks each: 4 gathers (not 8),
    and each micro-batch is gone before the next is gathered."""
    config = tiny_config(tmp_path, "log_with=[]", "sample.num_steps=4")
    accelerator = make_accelerator(config)
    run = build_components(config, accelerator)
    texts = [PROMPTS[i % 2] for i in range(4)]
    _, trajectory = rollout(
        run.policy, texts, torch.arange(4) % 2, torch.Generator().manual_seed(0)
    )
    alive: list[weakref.ref] = []
    index = Trajectory.index

    def spy(self, rows):
        gc.collect()
        assert all(ref() is None for ref in alive), "two micro-batches at once"
        part = index(self, rows)
        alive.append(weakref.ref(part))
        return part

    monkeypatch.setattr(Trajectory, "index", spy)
    cols = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]])
    batch = (trajectory, cols, torch.ones(4), torch.ones(4, dtype=torch.bool))
    settings = UpdateSettings("ddpo-is", clip_range=1e-4)
    run.model.train()
    accumulate_step(accelerator, run.policy, run.model, [batch], settings, 1, micro_batch=1)
    assert len(alive) == 4


def test_the_estimate_moves_the_epochs_chains_off_the_card(tmp_path):
    config = tiny_config(tmp_path, "memory.cpu=false", "sample.num_steps=5")
    offloaded = tiny_config(
        tmp_path, "memory.cpu=false", "sample.num_steps=5", "memory.offload_trajectory=true"
    )
    before, after = estimate(config), estimate(offloaded)
    sample, train = config.sample, config.train
    latent = math.prod(build_meta_models(config).latent_shape)  # (C, H, W) of one sample
    chain = lambda n: n * (sample.num_steps + 1) * latent * 4  # noqa: E731  float32
    epoch = sample.batch_size * sample.num_batches_per_epoch
    reward = before.phases["reward"].peak_bytes - after.phases["reward"].peak_bytes
    assert abs(reward - chain(epoch)) <= 512 * sample.num_batches_per_epoch  # block rounding
    # training: the epoch's and the step's chains leave; the train batch's comes over in turn
    step = min(train.gradient_accumulation * train.batch_size, epoch)
    saved = before.phases["training"].peak_bytes - after.phases["training"].peak_bytes
    expected = chain(epoch) + chain(step) - chain(train.batch_size)
    assert abs(saved - expected) <= 512 * (sample.num_batches_per_epoch + 2)
