"""Tests for ddpo_lite.advantages against hand-computed values.

All stds are population stds (divide by n). Expected values are rounded to 4 decimals, so they are
compared with abs=1e-4; the +1e-6 in the denominator is far below that tolerance.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ddpo_lite.advantages import EPS, PerPromptStatTracker, compute_advantages, group_advantages


def _list(t: torch.Tensor) -> list[float]:
    return t.flatten().tolist()


def test_single_prompt_population_std() -> None:
    # rewards [1, 2, 3], min_count 1 -> buffer stats: mean 2,
    # population std sqrt(((-1)^2 + 0^2 + 1^2) / 3) = sqrt(2/3) = 0.8165
    # advantages (r - 2) / 0.8165 = [-1.2247, 0, 1.2247]
    # (the sample std sqrt(2/2) = 1 would give [-1, 0, 1] instead)
    tracker = PerPromptStatTracker(buffer_size=10, min_count=1)
    adv = tracker.update(["p"] * 3, torch.tensor([1.0, 2.0, 3.0]))
    assert adv.dtype == torch.float32
    assert _list(adv) == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-4)


def test_global_stats_until_min_count_then_buffer_stats() -> None:
    tracker = PerPromptStatTracker(buffer_size=10, min_count=3)

    # Batch 1: a=[0, 2], b=[10, 12]. Each buffer holds 2 < 3 -> global batch stats:
    # mean (0+2+10+12)/4 = 6; deviations -6, -4, 4, 6; var (36+16+16+36)/4 = 26;
    # std sqrt(26) = 5.0990 -> [-6, -4, 4, 6] / 5.0990 = [-1.1767, -0.7845, 0.7845, 1.1767]
    adv1 = tracker.update(["a", "a", "b", "b"], torch.tensor([0.0, 2.0, 10.0, 12.0]))
    assert _list(adv1) == pytest.approx([-1.1767, -0.7845, 0.7845, 1.1767], abs=1e-4)

    # Batch 2: a=4, c=20.
    # a: buffer [0, 2, 4] has 3 >= 3 -> buffer stats: mean 2, var (4+0+4)/3 = 8/3,
    #    std 1.6330 -> (4 - 2) / 1.6330 = 1.2247
    # c: new prompt, buffer [20] has 1 < 3 -> batch stats of [4, 20]: mean 12, std 8
    #    -> (20 - 12) / 8 = 1.0
    # (all-global would give a: (4 - 12) / 8 = -1.0)
    adv2 = tracker.update(["a", "c"], torch.tensor([4.0, 20.0]))
    assert _list(adv2) == pytest.approx([1.2247, 1.0], abs=1e-4)

    # Batch 3: b=14 alone. Buffer [10, 12, 14] -> mean 12, std sqrt(8/3) = 1.6330
    # -> (14 - 12) / 1.6330 = 1.2247. Global stats of a one-sample batch would give 0.
    adv3 = tracker.update(["b"], torch.tensor([14.0]))
    assert _list(adv3) == pytest.approx([1.2247], abs=1e-4)

    assert tracker.stats() == {"num_prompts": 3, "mean_buffer_len": pytest.approx(7 / 3)}


def test_buffer_size_drops_oldest() -> None:
    tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
    tracker.update(["a"] * 3, torch.tensor([1.0, 2.0, 3.0]))
    # Buffer [1, 2, 3] + 10 -> keeps the 3 most recent: [2, 3, 10].
    # mean 15/3 = 5; deviations -3, -2, 5; var (9+4+25)/3 = 38/3 = 12.6667; std 3.5590
    # advantage (10 - 5) / 3.5590 = 1.4049
    # (an unbounded buffer [1, 2, 3, 10]: mean 4, var (9+4+1+36)/4 = 12.5, std 3.5355,
    #  advantage 6 / 3.5355 = 1.6971)
    adv = tracker.update(["a"], torch.tensor([10.0]))
    assert _list(adv) == pytest.approx([1.4049], abs=1e-4)
    assert tracker.state_dict()["buffers"] == {"a": [2.0, 3.0, 10.0]}
    assert tracker.stats() == {"num_prompts": 1, "mean_buffer_len": 3.0}


def test_prompts_with_different_scales_normalised_separately() -> None:
    prompts = ["easy", "easy", "hard", "hard"]
    rewards = torch.tensor([6.0, 8.0, 1.0, 2.0])

    # Per prompt: easy mean 7, std 1 -> [-1, 1]; hard mean 1.5, std 0.5 -> [-1, 1].
    tracker = PerPromptStatTracker(buffer_size=16, min_count=1)
    adv = compute_advantages(rewards, prompts, tracker, adv_clip_max=5.0)
    assert _list(adv) == pytest.approx([-1.0, 1.0, -1.0, 1.0], abs=1e-4)

    # Global: mean 17/4 = 4.25; deviations 1.75, 3.75, -3.25, -2.25;
    # var (3.0625 + 14.0625 + 10.5625 + 5.0625)/4 = 8.1875; std 2.8614
    # -> [0.6116, 1.3105, -1.1358, -0.7863]: every "easy" sample looks good.
    adv_global = compute_advantages(rewards, prompts, None, adv_clip_max=5.0)
    assert _list(adv_global) == pytest.approx([0.6116, 1.3105, -1.1358, -0.7863], abs=1e-4)


def test_prompt_order_interleaved() -> None:
    # Same numbers as above but interleaved: results must follow each reward's position.
    tracker = PerPromptStatTracker(buffer_size=16, min_count=1)
    adv = tracker.update(["e", "h", "e", "h"], torch.tensor([8.0, 1.0, 6.0, 2.0]))
    assert _list(adv) == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-4)


def test_clipping() -> None:
    # Nine 0s and one 10: mean 1; var (9 * 1 + 81) / 10 = 9; std 3
    # -> nine (0 - 1)/3 = -0.3333 and (10 - 1)/3 = 3.0
    rewards = torch.tensor([0.0] * 9 + [10.0])
    unclipped = compute_advantages(rewards, None, None, adv_clip_max=5.0)
    assert _list(unclipped) == pytest.approx([-1 / 3] * 9 + [3.0], abs=1e-4)

    clipped = compute_advantages(rewards, None, None, adv_clip_max=2.0)
    assert _list(clipped) == pytest.approx([-1 / 3] * 9 + [2.0], abs=1e-4)

    # Negative side, through the tracker path: 10 - rewards = nine 10s and one 0: mean 9, std 3
    # -> nine (10 - 9)/3 = 0.3333 (inside [-0.5, 0.5]) and (0 - 9)/3 = -3.0, clipped to -0.5.
    tracker = PerPromptStatTracker(buffer_size=32, min_count=1)
    clipped_neg = compute_advantages(10.0 - rewards, ["p"] * 10, tracker, adv_clip_max=0.5)
    assert _list(clipped_neg) == pytest.approx([1 / 3] * 9 + [-0.5], abs=1e-4)


def test_single_sample_and_constant_batch_give_zero() -> None:
    # std 0 -> (r - r) / (0 + 1e-6) = 0, not NaN.
    adv = compute_advantages(torch.tensor([3.5]), None, None, adv_clip_max=5.0)
    assert _list(adv) == [0.0]

    tracker = PerPromptStatTracker(buffer_size=8, min_count=4)  # global path (1 < 4)
    adv = compute_advantages(torch.tensor([3.5]), ["p"], tracker, adv_clip_max=5.0)
    assert _list(adv) == [0.0]

    # Constant non-representable rewards through the buffer path: mean is computed in float64,
    # so rounding error / 1e-6 stays tiny.
    tracker = PerPromptStatTracker(buffer_size=8, min_count=1)
    adv = tracker.update(["p"] * 3, torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64))
    assert all(math.isfinite(x) and abs(x) < 1e-6 for x in _list(adv))


@pytest.mark.parametrize("use_tracker", [False, True])
def test_non_finite_rewards_raise(use_tracker: bool) -> None:
    tracker = PerPromptStatTracker(buffer_size=8, min_count=1) if use_tracker else None
    rewards = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    with pytest.raises(ValueError, match=r"2 of 4 rewards are non-finite"):
        compute_advantages(rewards, ["a", "a", "b", "b"], tracker, adv_clip_max=5.0)
    if tracker is not None:
        # Nothing was recorded from the bad batch.
        assert tracker.stats()["num_prompts"] == 0


def test_tracker_update_rejects_non_finite() -> None:
    tracker = PerPromptStatTracker(buffer_size=8, min_count=1)
    with pytest.raises(ValueError, match=r"1 of 2 rewards are non-finite"):
        tracker.update(["a", "b"], torch.tensor([float("-inf"), 0.0]))
    assert tracker.state_dict()["buffers"] == {}


def test_state_dict_round_trip_reproduces_advantages() -> None:
    src = PerPromptStatTracker(buffer_size=4, min_count=3)
    gen = torch.Generator().manual_seed(0)
    prompts = ["a", "b", "c", "a", "b", "a"]
    for _ in range(3):
        src.update(prompts, torch.randn(len(prompts), generator=gen))

    state = json.loads(json.dumps(src.state_dict()))  # must be plain JSON data
    assert state["buffer_size"] == 4 and state["min_count"] == 3
    assert all(isinstance(x, float) for buf in state["buffers"].values() for x in buf)

    dst = PerPromptStatTracker(buffer_size=4, min_count=3)
    dst.load_state_dict(state)
    assert dst.stats() == src.stats()

    nxt = torch.randn(len(prompts), generator=gen)
    expected = src.update(prompts, nxt)
    got = dst.update(prompts, nxt)
    assert torch.equal(got, expected)

    # A fresh tracker (no history) gives different advantages, so the check above is meaningful.
    fresh = PerPromptStatTracker(buffer_size=4, min_count=3).update(prompts, nxt)
    assert not torch.allclose(fresh, expected)


def test_clear_and_stats() -> None:
    tracker = PerPromptStatTracker(buffer_size=8, min_count=1)
    assert tracker.stats() == {"num_prompts": 0, "mean_buffer_len": 0.0}
    tracker.update(["a", "a", "b"], torch.tensor([1.0, 2.0, 3.0]))
    # buffers a: 2 rewards, b: 1 -> mean length 1.5
    assert tracker.stats() == {"num_prompts": 2, "mean_buffer_len": 1.5}
    tracker.clear()
    assert tracker.stats() == {"num_prompts": 0, "mean_buffer_len": 0.0}


def test_shape_dtype_and_argument_checks() -> None:
    # 2-D float64 input -> same shape, float32. Global stats of [[1, 2], [3, 4]]:
    # mean 2.5, var (2.25 + 0.25 + 0.25 + 2.25)/4 = 1.25, std 1.1180
    # -> [[-1.3416, -0.4472], [0.4472, 1.3416]]
    rewards = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    adv = compute_advantages(rewards, None, None, adv_clip_max=5.0)
    assert adv.shape == (2, 2) and adv.dtype == torch.float32
    assert _list(adv) == pytest.approx([-1.3416, -0.4472, 0.4472, 1.3416], abs=1e-4)

    tracker = PerPromptStatTracker(buffer_size=8, min_count=1)
    with pytest.raises(ValueError, match="prompts"):
        compute_advantages(torch.tensor([1.0, 2.0]), None, tracker, adv_clip_max=5.0)
    with pytest.raises(ValueError, match="3 prompts for 2 rewards"):
        tracker.update(["a", "b", "c"], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="adv_clip_max"):
        compute_advantages(torch.tensor([1.0, 2.0]), None, None, adv_clip_max=0.0)
    with pytest.raises(ValueError, match="buffer_size"):
        PerPromptStatTracker(buffer_size=0, min_count=1)


def test_group_advantages_leave_one_out() -> None:
    """Each reward minus the mean of the rest of its group, over the batch std of those."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 13.0, 7.0])
    groups = torch.tensor([5, 5, 5, 2, 2, 2, 9])  # group 9 has one member: no baseline
    centred = np.array([1 - 2.5, 2 - 2, 3 - 1.5, 10 - 11.5, 10 - 11.5, 13 - 10, 0.0])
    expected = centred / (centred.std() + EPS)
    got = group_advantages(rewards, groups, adv_clip_max=5.0)
    assert got.dtype == torch.float32 and got.shape == rewards.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    # a group's offset (prompt difficulty, starting noise) leaves no trace
    shifted = group_advantages(rewards + torch.tensor([0, 0, 0, 50, 50, 50, 0.0]), groups, 5.0)
    torch.testing.assert_close(shifted, got)
    assert group_advantages(rewards, groups, adv_clip_max=0.5).abs().max() <= 0.5
    with pytest.raises(ValueError, match="group ids"):
        group_advantages(rewards, groups[:3], 5.0)
