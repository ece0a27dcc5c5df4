"""The rollout and the update's scoring never wait on the accelerator.

A read of a device tensor's value (`.item()`, `bool(t)`, `int(t)`, indexing with a 0-dim tensor)
stalls a GPU's queue until everything before it has run, and a copy from the host waits too.
On PyTorch's meta device reading a value raises, and a dispatch mode sees every copy from the
host, so running every family's rollout and scoring there shows on the CPU what a GPU run
would do: no read of a device value at all, and one copy from the host per stochastic step (the
noise the CPU generator draws, as diffusers' pipelines do with a CPU generator) plus the
initial latents and the prompt indices.
"""

import pytest
import torch
from conftest import tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from ddpo_lite.policy import Policy
from ddpo_lite.sampling import rollout
from ddpo_lite.trainer import build_components, make_accelerator, make_sampler
from ddpo_lite.update import score_log_probs

META = torch.device("meta")
PROMPTS = ["a cat", "a dog"]


class HostCopies(TorchDispatchMode):
    """Counts copies from the CPU to the meta device (the stand-in accelerator)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in ("_to_copy", "copy_") and isinstance(args[0], torch.Tensor):
            src = args[0] if name == "_to_copy" else args[1]
            dst = out if name == "_to_copy" else args[0]
            if src.device.type == "cpu" and src.dim() > 0 and dst.device == META:
                self.count += 1
        return out


class _MetaEncoder:
    """The run's cached conditioning of `prompts`, on the meta device (a run's cache lives on
    the accelerator: encoded once at setup)."""

    def __init__(self, encoder, prompts):
        self.device, self.resolution = META, encoder.resolution
        cond, negative = encoder(prompts)
        self.cached = {tuple(prompts): (cond.to(META), negative.to(META))}

    def __call__(self, prompts):
        return self.cached[tuple(prompts)]


def _meta_policy(tmp_path, model: str, *overrides: str) -> Policy:
    config = tiny_config(
        tmp_path,
        f'model.name="{model}"',
        "log_with=[]",
        "sample.num_steps=4",
        "memory.mixed_precision='no'",
        *overrides,
    )
    run = build_components(config, make_accelerator(config))
    policy = run.policy
    return Policy(
        family=policy.family,
        pipe=policy.pipe,
        denoiser=policy.denoiser.to(META),
        sampler=make_sampler(policy.pipe, policy.family, config, policy.resolution, META),
        encoder=_MetaEncoder(policy.encoder, PROMPTS),
        guidance_scale=policy.guidance_scale,
        resolution=policy.resolution,
    )


CASES = [
    ("tiny", ["sample.eta=1.0"], 4),
    ("tiny-sdxl", ["sample.eta=1.0"], 4),
    ("tiny-sd3", ["sample.eta=0.7"], 4),
    ("tiny-sd3", ["sample.eta=0.7", "sample.flow_sampler='cps'"], 3),  # the last step: no noise
    ("tiny-sd3", ["sample.eta=0.7", "sample.sde_window_size=2"], 2),
    ("tiny-flux", ["sample.eta=0.7"], 4),
    ("tiny-flux2", ["sample.eta=0.7"], 4),
]


@pytest.mark.parametrize(("model", "overrides", "noisy_steps"), CASES)
def test_rollout_and_scoring_make_no_device_sync(
    tmp_path, monkeypatch, model, overrides, noisy_steps
):
    policy = _meta_policy(tmp_path, model, *overrides)
    monkeypatch.setattr(type(policy.family), "decode", lambda self, pipe, latents: [])
    window = range(1, 3) if any("window" in o for o in overrides) else None

    with HostCopies() as copies:  # a value read on the meta device raises
        _, trajectory = rollout(
            policy, PROMPTS, torch.arange(2), torch.Generator().manual_seed(0), window=window
        )
    assert trajectory.log_probs.shape == (2, noisy_steps)
    assert trajectory.chain.device == META
    assert copies.count == noisy_steps + 2  # each step's noise, x_T, the prompt indices

    cols = torch.tensor([[1, 0], [0, 1]], device=META)
    with HostCopies() as copies:
        new, kl = score_log_probs(policy, policy.denoiser, trajectory, cols, kl_coef=0.1)
    assert new.shape == (2, 2) and new.device == META
    assert copies.count == 0


def test_the_check_can_fail(tmp_path):
    """The meta device does raise on a value read, and the counter does see a host copy."""
    with pytest.raises((RuntimeError, NotImplementedError)):
        bool(torch.ones(2, device=META).any())
    with HostCopies() as copies:
        torch.ones(3).to(META)
    assert copies.count == 1
