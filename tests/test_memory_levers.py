"""Memory levers: each switch does what it says, or says clearly why it cannot."""

import importlib.util
import sys

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from ddpo_lite.config import TrainConfig
from ddpo_lite.models import load_pipeline
from ddpo_lite.models.memory import MissingDependencyError, set_attention
from ddpo_lite.trainer import make_optimizer


def unet_output(unet):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return unet(x, 400, encoder_hidden_states=emb).sample


def test_attention_backends_switch_and_agree():
    unet = load_pipeline("tiny").unet
    set_attention(unet, "math")
    assert all(isinstance(p, AttnProcessor) for p in unet.attn_processors.values())
    math_out = unet_output(unet)
    set_attention(unet, "sdpa")
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    torch.testing.assert_close(unet_output(unet), math_out, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers installed")
def test_xformers_missing_is_a_clear_error():
    unet = load_pipeline("tiny").unet
    with pytest.raises(MissingDependencyError, match=r"pip install 'ddpo-lite\[xformers\]'"):
        set_attention(unet, "xformers")


def test_8bit_adam_keeps_8bit_state():
    """bitsandbytes keeps 8-bit state only for tensors of >= 4096 elements: check that it does
    for one, rather than trusting the class name."""
    pytest.importorskip("bitsandbytes")
    big = torch.nn.Parameter(torch.randn(64, 128))  # 8192 elements
    opt = make_optimizer([big], TrainConfig(), use_8bit=True, device=torch.device("cpu"))
    assert type(opt).__name__ == "AdamW8bit"
    big.grad = torch.randn_like(big)
    opt.step()
    state = opt.state[big]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


def test_8bit_adam_fallback_is_announced(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.warns(UserWarning, match="using torch AdamW"):
        opt = make_optimizer([p], TrainConfig(), use_8bit=True, device=torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)


def test_offload_vae_places_the_vae_on_the_cpu_at_setup():
    """memory.offload_vae: the denoiser goes to the accelerator (the meta device stands in for
    one here: a second device kind), the VAE stays on the CPU; without it both go."""
    from ddpo_lite.config import MemoryConfig
    from ddpo_lite.models.memory import apply_memory_settings

    for offload, vae_on in ((True, "cpu"), (False, "meta")):
        pipe = load_pipeline("tiny")
        memory = MemoryConfig(mixed_precision="no", offload_vae=offload)
        apply_memory_settings(pipe, memory, torch.device("meta"))
        assert {p.device.type for p in pipe.unet.parameters()} == {"meta"}
        assert {p.device.type for p in pipe.vae.parameters()} == {vae_on}


def test_offload_vae_visits_the_device_only_to_decode(tmp_path, monkeypatch):
    """Each rollout's decode brings the VAE to the latents' device and sends it back to the CPU
    (also when the decode raises); nothing else moves it; the images are the same as without."""
    import dataclasses

    import numpy as np

    from ddpo_lite.sampling import rollout
    from ddpo_lite.trainer import build_components, make_accelerator
    from tests.conftest import tiny_config

    config = tiny_config(tmp_path, "sample.num_steps=2", "memory.offload_vae=true")
    accelerator = make_accelerator(config)
    run = build_components(config, accelerator)
    policy, vae = run.policy, run.pipe.vae
    assert policy.offload_vae
    events = []
    move = vae.to

    def to(*args, **kwargs):
        events.append(("to", torch.device(args[0]).type))
        return move(*args, **kwargs)

    monkeypatch.setattr(vae, "to", to)
    family = type(policy.family)
    real_decode = family.decode

    def decode(self, pipe, latents):
        events.append(("decode", latents.device.type))
        return real_decode(self, pipe, latents)

    monkeypatch.setattr(family, "decode", decode)
    prompts, ids = ["a cat", "a dog"], torch.tensor([0, 1])

    def images(p):
        out, _ = rollout(p, prompts, ids, torch.Generator().manual_seed(0))
        return [np.asarray(image) for image in out]

    offloaded = images(policy)
    assert events == [("to", "cpu"), ("decode", "cpu"), ("to", "cpu")]  # the device is the CPU
    events.clear()
    resident = images(dataclasses.replace(policy, offload_vae=False))
    assert events == [("decode", "cpu")]
    for a, b in zip(offloaded, resident, strict=True):
        np.testing.assert_array_equal(a, b)

    def fails(self, pipe, latents):
        events.append(("decode", latents.device.type))
        raise RuntimeError("decode failed")

    events.clear()
    monkeypatch.setattr(family, "decode", fails)
    with pytest.raises(RuntimeError, match="decode failed"):
        images(policy)
    assert events[-1] == ("to", "cpu")  # back on the CPU after the error
    accelerator.end_training()
