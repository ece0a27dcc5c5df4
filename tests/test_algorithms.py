"""The losses as pure functions, checked against numbers worked out by hand."""

import math

import pytest
import torch

from ddpo_lite.algorithms import ddpo_is_loss, ddpo_sf_loss, rwr_loss, rwr_weights


def test_ddpo_is_clipping_by_hand():
    # ratios r = exp(new - old) = [1.0, 1.2, 0.7]; eps = 0.1 -> clip(r) = [1.0, 1.1, 0.9]
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.0, 1.2, 0.7]))
    adv = torch.tensor([2.0, 1.0, -1.0])
    loss, stats = ddpo_is_loss(new, old, adv, clip_range=0.1)
    # terms max(-A r, -A clip r):
    #   A=2,  r=1.0: max(-2.0, -2.0) = -2.0
    #   A=1,  r=1.2: max(-1.2, -1.1) = -1.1   (clipped: no incentive past 1 + eps)
    #   A=-1, r=0.7: max( 0.7,  0.9) =  0.9   (clipped branch is the pessimistic one)
    assert loss.item() == pytest.approx(-2.0 - 1.1 + 0.9, abs=1e-6)
    assert stats["clipfrac"].item() == 2  # |r - 1| > 0.1 for two elements (a sum)
    # approx_kl = sum 0.5 (new - old)^2 = 0.5 (log 1.2)^2 + 0.5 (log 0.7)^2
    expected_kl = 0.5 * math.log(1.2) ** 2 + 0.5 * math.log(0.7) ** 2
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, rel=1e-5)


def test_ddpo_is_gradient_by_hand():
    # inside the clip range d/d new of -A exp(new - old) at new = old is -A
    new = torch.zeros(2, requires_grad=True)
    loss, _ = ddpo_is_loss(new, torch.zeros(2), torch.tensor([3.0, -0.5]), clip_range=0.2)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([-3.0, 0.5]))
    # outside it (ratio 1.5 > 1.2 with A > 0) the clipped branch is constant: no gradient
    new = torch.full((1,), math.log(1.5), requires_grad=True)
    loss, _ = ddpo_is_loss(new, torch.zeros(1), torch.tensor([1.0]), clip_range=0.2)
    loss.backward()
    assert new.grad.item() == 0.0


def test_ddpo_sf_is_reinforce():
    new = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss, _ = ddpo_sf_loss(new, new.detach(), torch.tensor([0.5, -1.0]))
    # -A logp summed: -(0.5 * -1) - (-1 * -2) = 0.5 - 2 = -1.5; gradient -A
    assert loss.item() == pytest.approx(-1.5)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([-0.5, 1.0]))


def test_rwr_loss_by_hand():
    # per-sample mse: sample 0: mean([1, 1]^2 ... ) ; pred - noise = [[1, 1], [0, 2]]
    pred = torch.tensor([[1.0, 1.0], [0.0, 2.0]]).view(2, 1, 1, 2)
    noise = torch.zeros(2, 1, 1, 2)
    # mse = [1.0, 2.0]; weights [2, 0.5] -> 2*1 + 0.5*2 = 3
    loss, stats = rwr_loss(pred, noise, torch.tensor([2.0, 0.5]))
    assert loss.item() == pytest.approx(3.0)
    assert stats["mse"].item() == pytest.approx(3.0)


def test_rwr_weights_by_hand():
    r = torch.tensor([0.0, math.log(3.0)])
    # exp weighting, T = 1: exp(r - max) = [1/3, 1] -> normalised to mean 1: [0.5, 1.5]
    torch.testing.assert_close(rwr_weights(r, "exp", 1.0, 0.9), torch.tensor([0.5, 1.5]))
    # sparse: rewards at or above the 75% quantile of [1, 2, 3, 4] (= 3.25) -> only 4
    w = rwr_weights(torch.tensor([1.0, 2.0, 3.0, 4.0]), "sparse", 1.0, 0.75)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 0.0, 4.0]))
    with pytest.raises(ValueError, match="weighting"):
        rwr_weights(r, "linear", 1.0, 0.9)
