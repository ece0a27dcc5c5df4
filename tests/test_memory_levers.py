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
