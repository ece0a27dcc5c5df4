"""The reward protocol: one name, a weighted sum, a user's own function; rewards scored while
the next batch samples and landing with their own samples; a broken reward stops the run with a
message naming it."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from ddpo_lite.config import load_config, to_toml
from ddpo_lite.rewards import UnknownRewardError
from ddpo_lite.rewards.compose import RewardError, build_reward
from ddpo_lite.rewards.jpeg import jpeg_size_kb
from ddpo_lite.trainer import build_components, make_accelerator, sample_epoch, train

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_reward.py"


def _images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_weighted_sum_from_toml_and_set(tmp_path):
    config = load_config(
        "tiny",
        ["reward.weights={jpeg_compressibility = 1.0, jpeg_incompressibility = 0.25}"],
    )
    assert config.reward.weights == {"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.25}
    # the resolved config writes and reads back the table
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config))
    assert load_config(str(path)).reward.weights == config.reward.weights

    images = _images(3)
    rewards, info = build_reward(config.reward)(images, ["a"] * 3, [{}] * 3)
    sizes = np.array([jpeg_size_kb(image) for image in images])
    np.testing.assert_allclose(rewards, -sizes + 0.25 * sizes)
    np.testing.assert_allclose(info["jpeg_compressibility"], -sizes)


def test_user_reward_from_a_file_and_a_module(tmp_path, monkeypatch):
    file = tmp_path / "mine.py"
    file.write_text(
        "import numpy as np\n"
        "def score(images, prompts, metadata):\n"
        "    return np.array([len(p) for p in prompts], dtype=float), {}\n"
    )
    config = load_config("tiny", [f"reward.name='{file}:score'"])
    rewards, _ = build_reward(config.reward)(_images(2), ["ab", "abcd"], [{}, {}])
    np.testing.assert_array_equal(rewards, [2.0, 4.0])

    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_config("tiny", ["reward.name='mine:score'"])
    rewards, _ = build_reward(config.reward)(_images(1), ["xyz"], [{}])
    assert rewards.tolist() == [3.0]

    for bad in (f"{file}:nope", "no_such_module_xyz:f", f"{tmp_path / 'absent.py'}:f"):
        with pytest.raises(UnknownRewardError, match="reward"):
            build_reward(load_config("tiny", [f"reward.name='{bad}'"]).reward)


def test_the_custom_reward_example_trains(tmp_path):
    config = tiny_config(
        tmp_path,
        f"reward.name='{EXAMPLE}:brightness'",
        "num_epochs=1",
        "sample.num_steps=2",
        "sample.num_batches_per_epoch=1",
        "log_with=[]",
    )
    result = train(config, show_progress=False)
    assert 0 <= result.metrics[0]["reward_mean"] <= 1


@pytest.mark.parametrize(
    "reward, message",
    [
        (lambda images, prompts, metadata: 1 / 0, "raised ZeroDivisionError"),
        (lambda images, prompts, metadata: (np.zeros(len(images) + 1), {}), "shape"),
        (lambda images, prompts, metadata: np.zeros(len(images)), "must return"),
    ],
    ids=["raises", "wrong-length", "no-info"],
)
def test_a_broken_reward_stops_the_run_naming_it(tmp_path, reward, message):
    config = tiny_config(
        tmp_path,
        "num_epochs=2",
        "sample.num_steps=2",
        "sample.num_batches_per_epoch=1",
        "log_with=[]",
    )
    with pytest.raises(RewardError, match=message) as err:
        train(config, reward_fn=reward, show_progress=False)
    assert "stopped in epoch 1" in str(err.value) and "--resume" in str(err.value)


def test_rewards_overlap_sampling_and_land_with_their_samples(tmp_path):
    """Batch k is scored in the worker while batch k+1 samples; rewards come back in order."""
    config = tiny_config(
        tmp_path, "sample.num_steps=4", "sample.num_batches_per_epoch=3", "sample.batch_size=4"
    )
    accelerator = make_accelerator(config)
    run = build_components(config, accelerator)
    prompts = ["a cat", "a dog", "a horse", "a bird"]
    calls = []  # (batch start, end, thread name)
    sampled = []  # time each batch finished sampling

    def reward(images, texts, metadata):
        began = time.perf_counter()
        time.sleep(0.4)  # a slow reward model
        values = [
            np.asarray(image, dtype=np.float64).mean() + prompts.index(text)
            for image, text in zip(images, texts, strict=True)
        ]
        calls.append((began, time.perf_counter(), threading.current_thread().name))
        return np.array(values), {}

    with ThreadPoolExecutor(1, "ddpo-lite-reward") as executor:
        result = sample_epoch(
            run,
            prompts,
            config,
            torch.Generator().manual_seed(0),
            accelerator,
            reward,
            advance=lambda: sampled.append(time.perf_counter()),
            executor=executor,
        )
    accelerator.end_training()
    # every reward ran in the worker, and batch 0 was being scored while batch 1 sampled
    assert all(name.startswith("ddpo-lite-reward") for _, _, name in calls)
    assert len(calls) == 3
    assert calls[0][0] < sampled[1] and calls[0][1] > sampled[0]
    # and each reward belongs to its own image and prompt
    expected = [
        np.asarray(image, dtype=np.float64).mean() + prompts.index(text)
        for image, text in zip(result.images, result.prompts, strict=True)
    ]
    np.testing.assert_allclose(result.rewards, expected)
    assert len(result.rewards) == len(result.trajectory) == 12
