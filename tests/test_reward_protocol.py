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


def _checked(values):
    from ddpo_lite.rewards.compose import CheckedReward

    return CheckedReward(lambda images, prompts, metadata: (values, {}), "mine")(
        _images(2), ["a", "b"], [{}, {}]
    )


@pytest.mark.parametrize(
    "values, message",
    [
        (np.array([True, False]), "booleans, not numbers"),
        ([True, 0.5], "booleans, not numbers"),
        (torch.tensor([True, False]), "a bool tensor"),
        (["0.5", "1"], "strings such as '0.5', not numbers"),
        ([0.5, "1"], "strings such as '1', not numbers"),
        (np.array([1j, 2j]), "complex numbers"),
    ],
    ids=["bool-array", "bool-in-list", "bool-tensor", "strings", "a-string", "complex"],
)
def test_rewards_must_be_numbers(values, message):
    """Booleans and strings are refused in one line, not read as 1.0/0.0 or parsed."""
    with pytest.raises(RewardError, match=f"reward 'mine' returned non-numeric rewards: {message}"):
        _checked(values)


def test_rewards_with_gradients_are_detached():
    """A reward computed with autograd (or a list of 0-d tensors) is read as plain numbers."""
    weights = torch.tensor([1.0, 2.0], requires_grad=True)
    rewards, _ = _checked(weights * 3)
    assert rewards.dtype == np.float64 and rewards.tolist() == [3.0, 6.0]
    rewards, _ = _checked([weights[0] * 1, weights[1].to(torch.bfloat16)])
    assert rewards.tolist() == [1.0, 2.0]
    rewards, _ = _checked([np.float32(0.5), None])  # None is NaN, as before
    assert rewards[0] == 0.5 and np.isnan(rewards[1])


def test_weighted_parts_are_checked_each_by_name():
    from ddpo_lite.rewards.compose import CheckedReward, WeightedSum

    def flags(images, prompts, metadata):
        return np.ones(len(images), dtype=bool), {}

    reward = build_reward(load_config("tiny", ["reward.weights={jpeg_compressibility=1.0}"]).reward)
    name, weight, part = reward.reward.parts[0]
    assert isinstance(part, CheckedReward) and part.name == "jpeg_compressibility"
    summed = CheckedReward(WeightedSum([("flags", 1.0, CheckedReward(flags, "flags"))]), "sum")
    with pytest.raises(RewardError, match="reward 'flags' returned non-numeric rewards: booleans"):
        summed(_images(2), ["a", "b"], [{}, {}])


@pytest.mark.parametrize("overlap", [True, False])
def test_sys_exit_in_a_reward_is_one_line_and_ctrl_c_stops_the_run(tmp_path, overlap):
    """SystemExit raised in the reward (in its worker thread or not) stops the run with the
    one-line RewardError; KeyboardInterrupt goes through as the stop it is."""
    overrides = ["sample.num_steps=2", "sample.num_batches_per_epoch=1", "log_with=[]"]
    config = tiny_config(
        tmp_path, "num_epochs=1", f"reward.overlap={str(overlap).lower()}", *overrides
    )

    def exits(images, prompts, metadata):
        raise SystemExit(3)

    with pytest.raises(RewardError, match="reward 'exits' raised SystemExit: 3") as err:
        train(config, reward_fn=exits, show_progress=False)
    assert "stopped in epoch 1" in str(err.value)

    def interrupted(images, prompts, metadata):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, reward_fn=interrupted, show_progress=False, overwrite=True)


def _hanging_reward(started: threading.Event, release: threading.Event, safety: float = 8.0):
    """A reward that never returns (until `release`, set by the test or after `safety` s)."""

    def hangs(images, prompts, metadata):
        started.set()
        release.wait(safety)
        return np.zeros(len(images)), {}

    return hangs


@pytest.mark.parametrize("overlap", [True, False])
def test_a_reward_that_never_returns_stops_the_run(tmp_path, overlap):
    """reward.local_timeout bounds one batch's in-process reward call: the run stops in one
    line instead of hanging, and does not wait for the hung call to end."""
    overrides = ["sample.num_steps=2", "sample.num_batches_per_epoch=2", "log_with=[]"]
    config = tiny_config(
        tmp_path,
        "num_epochs=1",
        "reward.local_timeout=1.5",
        f"reward.overlap={str(overlap).lower()}",
        *overrides,
    )
    started, release = threading.Event(), threading.Event()
    begun = time.monotonic()
    try:
        with pytest.raises(RewardError) as err:
            train(config, reward_fn=_hanging_reward(started, release), show_progress=False)
        elapsed = time.monotonic() - begun
    finally:
        release.set()
    message = str(err.value)
    assert "reward 'hangs' did not return within reward.local_timeout = 1.5s" in message
    assert "stopped in epoch 1" in message and "--resume" in message
    assert elapsed < 7.5  # the safety release (8 s) would let it finish instead


def test_ctrl_c_while_waiting_on_the_reward_stops_within_seconds(tmp_path):
    """Ctrl-C while the trainer waits for a reward that hangs stops the run at once: it never
    waits for the reward thread to finish."""
    import signal

    config = tiny_config(
        tmp_path,
        "num_epochs=1",
        "sample.num_steps=2",
        "sample.num_batches_per_epoch=1",
        "log_with=[]",
    )
    started, release = threading.Event(), threading.Event()
    main_thread = threading.main_thread().ident
    sent = []

    def press_ctrl_c():
        if started.wait(60):
            time.sleep(0.3)  # the trainer is waiting on the reward by now
            sent.append(time.monotonic())
            signal.pthread_kill(main_thread, signal.SIGINT)

    # Python's own SIGINT handler, as a user's terminal has it (a pytest-xdist worker ignores
    # SIGINT: its controller handles Ctrl-C)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            train(config, reward_fn=_hanging_reward(started, release, 6.0), show_progress=False)
        stopped = time.monotonic()
    finally:
        release.set()
        signal.signal(signal.SIGINT, previous)
    assert sent and stopped - sent[0] < 3  # the old shutdown(wait=True) waited out the 6 s
