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


# --- DiffusionNFT and AWM (hand-computed values in the comments) ------------------------------


def test_nft_loss_by_hand():
    from ddpo_lite.algorithms import nft_loss

    # one element; on-policy (x0_old = x0_pred = 1), target 0, beta 1, r 0.75, m 5:
    # x0+ = 1, x0- = 2*1 - 1 = 1; l+ = l- = 1^2 / 1 = 1; loss = 5/1 * (0.75 + 0.25) = 5
    x0_pred = torch.ones(1, 1, 1, 1, requires_grad=True)
    loss, stats = nft_loss(x0_pred, torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1),
                           torch.tensor([0.75]), beta=1.0, adv_clip_max=5.0)  # fmt: skip
    assert float(loss.detach()) == pytest.approx(5.0)
    # d/dx0_pred: 5 * (0.75 * 2 * 1 * beta - 0.25 * 2 * 1 * beta) / 1 = 5: on-policy the gradient
    # is (m / beta) * 2 * beta * (2r - 1) * error / scale, an advantage-weighted regression
    loss.backward()
    assert float(x0_pred.grad) == pytest.approx(5.0)
    # two equal elements; beta 0.5, x0_old 2, x0_pred 1, target 0, r 0.2:
    # x0+ = 0.5 + 1 = 1.5 -> 2.25 / 1.5 = 1.5; x0- = 1.5 * 2 - 0.5 = 2.5 -> 6.25 / 2.5 = 2.5
    # loss = 5 / 0.5 * (0.2 * 1.5 + 0.8 * 2.5) = 10 * 2.3 = 23
    loss, stats = nft_loss(torch.ones(1, 2, 1, 1), torch.full((1, 2, 1, 1), 2.0),
                           torch.zeros(1, 2, 1, 1), torch.tensor([0.2]), 0.5, 5.0)  # fmt: skip
    assert float(loss) == pytest.approx(23.0)
    assert float(stats["positive_loss"]) == pytest.approx(1.5)
    assert float(stats["negative_loss"]) == pytest.approx(2.5)


def test_optimality_probability_by_hand():
    from ddpo_lite.algorithms import optimality_probability

    advantages = torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 7.0])
    expected = torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0])  # clip(A, -5, 5) / 5 / 2 + 1/2
    torch.testing.assert_close(optimality_probability(advantages, 5.0), expected)


def test_awm_loss_by_hand():
    from ddpo_lite.algorithms import awm_loss

    out, target = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)
    adv, t = torch.tensor([-0.5]), torch.tensor([0.5])
    # e = (1 + 9) / 2 = 5; uniform: -0.5 * 5 = -2.5
    loss, stats = awm_loss(out, target, adv, t, "uniform")
    assert float(loss) == pytest.approx(-2.5) and float(stats["mse"]) == pytest.approx(5.0)
    # ghuber, p = 0.5: t * ((5 + 1e-10)^0.5 - 1e-5) / 0.5 = sqrt(5) - 1e-5; times -0.5
    loss, _ = awm_loss(out, target, adv, t, "ghuber", power=0.5)
    assert float(loss) == pytest.approx(-0.5 * (5**0.5 - 1e-5), rel=1e-6)
    with pytest.raises(ValueError, match="weighting"):
        awm_loss(out, target, adv, t, "huber")
