"""Checkpoints and resume: a resumed run continues exactly, a killed run loses at most one epoch,
and an output folder that holds a run is never overwritten by accident."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from ddpo_lite.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from ddpo_lite.config import ConfigError
from ddpo_lite.models.lora import LORA_WEIGHT_NAME
from ddpo_lite.run_files import RunExistsError
from ddpo_lite.trainer import train

# per-prompt statistics on, so that the tracker's buffers must survive the resume too
SHORT = [
    "sample.num_steps=3",
    "sample.num_batches_per_epoch=1",
    "advantages.per_prompt_stat_tracking=true",
    "advantages.min_count=2",
    "log_with=[]",
]


def _lora(output_dir):
    return load_file(output_dir / "lora" / LORA_WEIGHT_NAME)


def _rows(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_plus_two_epochs_equal_four(tmp_path):
    straight = tiny_config(tmp_path / "a", "num_epochs=4", *SHORT)
    train(straight, show_progress=False)

    first = tiny_config(tmp_path / "b", "num_epochs=2", *SHORT)
    train(first, show_progress=False)
    assert [p.name for p in list_checkpoints(first.output_dir)] == ["epoch_0001", "epoch_0002"]
    rest = tiny_config(tmp_path / "b", "num_epochs=4", *SHORT)
    result = train(rest, resume=True, show_progress=False)

    assert [row["epoch"] for row in result.metrics] == [1, 2, 3, 4]
    a, b = _lora(tmp_path / "a" / "run"), _lora(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    moved = sum(float(v.abs().sum()) for k, v in a.items() if "lora.up" in k)
    assert moved > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # the resumed run drew the same samples: same rewards, epoch by epoch
    rows_a, rows_b = _rows(tmp_path / "a" / "run"), _rows(tmp_path / "b" / "run")
    assert [r["epoch"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra["reward_mean"] == pytest.approx(rb["reward_mean"], rel=1e-6)
    # checkpoints are named by epochs completed, and only the latest two are kept
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "run")] == [
        "epoch_0003",
        "epoch_0004",
    ]


def test_checkpoint_restores_optimizer_and_tracker(tmp_path):
    config = tiny_config(tmp_path, "num_epochs=1", *SHORT)
    result = train(config, show_progress=False)
    checkpoint = latest_checkpoint(config.output_dir)
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["epoch"] == 1
    assert sum(len(b) for b in state["tracker"]["buffers"].values()) == 8
    # loading into a fresh optimizer gives back the saved moments
    optimizer = torch.optim.AdamW([p for p in result.pipeline.unet.parameters() if p.requires_grad])
    load_checkpoint(checkpoint, unet=result.pipeline.unet, optimizer=optimizer)
    saved = load_file(checkpoint / "optimizer.safetensors")
    restored = optimizer.state_dict()["state"]
    assert len(restored) == len({k.split("/")[0] for k in saved})
    torch.testing.assert_close(restored[0]["exp_avg"], saved["0/exp_avg"])
    # the checkpoint's folder and files have the permissions the umask gives, not 0700 / 0600
    umask = os.umask(0)
    os.umask(umask)
    assert checkpoint.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (checkpoint / "state.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_output_folder_with_a_run_is_refused(tmp_path):
    config = tiny_config(tmp_path, "num_epochs=1", *SHORT)
    train(config, show_progress=False)
    with pytest.raises(RunExistsError, match="--resume.*--overwrite"):
        train(config, show_progress=False)
    marker = tmp_path / "run" / "notes.txt"
    marker.write_text("mine")
    train(config, overwrite=True, show_progress=False)
    assert marker.read_text() == "mine"  # overwrite removes only what a run writes
    assert len(_rows(tmp_path / "run")) == 1
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(tiny_config(tmp_path / "empty", *SHORT), resume=True)


def test_sigkill_mid_epoch_loses_at_most_that_epoch(tmp_path):
    """A run killed with SIGKILL mid-epoch resumes from its last checkpoint; the finished run
    has each epoch's metrics exactly once, and every checkpoint left behind loads."""
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--output", str(out), "--quiet"]
    sets = ["num_epochs=5", "sample.num_steps=5", "log_with=[]"]
    for item in sets:
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpo_lite.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                time.sleep(0.5)  # into the next epoch
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        done_at_kill = len(metrics.read_text().splitlines())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    checkpoint = latest_checkpoint(out)
    epoch = int(checkpoint.name.split("_")[1])
    assert epoch >= done_at_kill - 1  # at most the epoch being saved or run is lost
    for folder in list_checkpoints(out):
        assert json.loads((folder / "state.json").read_text())["epoch"] == int(
            folder.name.split("_")[1]
        )

    from ddpo_lite.cli import main

    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert [row["epoch"] for row in _rows(out)] == list(range(1, 6))
    assert latest_checkpoint(out).name == "epoch_0005"


# rank 128 on the tiny UNet: every LoRA matrix has >= 4096 elements (e.g. to_q's A is 128 x 32),
# so bitsandbytes keeps real 8-bit moments (its quantization state nests inside each param's
# state) and the checkpoint must round-trip them exactly
EIGHT_BIT = [*SHORT, "memory.use_8bit_adam=true", "lora.rank=128", "lora.alpha=128"]


def test_8bit_adam_state_resumes_bit_for_bit(tmp_path):
    pytest.importorskip("bitsandbytes")
    straight = tiny_config(tmp_path / "a", "num_epochs=4", *EIGHT_BIT)
    train(straight, show_progress=False)
    saved = load_file(latest_checkpoint(straight.output_dir) / "optimizer.safetensors")
    moments = [v for k, v in saved.items() if k.endswith(("/state1", "/state2"))]
    assert moments and all(v.dtype == torch.uint8 for v in moments)  # really 8-bit state

    train(tiny_config(tmp_path / "b", "num_epochs=2", *EIGHT_BIT), show_progress=False)
    train(tiny_config(tmp_path / "b", "num_epochs=4", *EIGHT_BIT), resume=True, show_progress=False)

    a, b = _lora(tmp_path / "a" / "run"), _lora(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    assert sum(float(v.abs().sum()) for k, v in a.items() if "lora.up" in k) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    end_a = load_file(latest_checkpoint(tmp_path / "a" / "run") / "optimizer.safetensors")
    end_b = load_file(latest_checkpoint(tmp_path / "b" / "run") / "optimizer.safetensors")
    assert end_a.keys() == end_b.keys()
    for key in end_a:
        assert torch.equal(end_a[key], end_b[key]), key
    rows_a, rows_b = _rows(tmp_path / "a" / "run"), _rows(tmp_path / "b" / "run")
    assert [r["reward_mean"] for r in rows_a] == [r["reward_mean"] for r in rows_b]


def test_resume_applies_new_optimizer_settings_and_refuses_another_rank(tmp_path, capsys):
    from ddpo_lite.cli import main

    out = tmp_path / "run"
    train(tiny_config(tmp_path, "num_epochs=1", *SHORT), show_progress=False)

    # another rank: one line naming both ranks, not a size-mismatch traceback
    assert main(["train", "--resume", str(out), "--set", "lora.rank=8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "lora.rank = 4" in err and "asks for 8" in err and "Traceback" not in err

    # a new learning rate and betas on resume are applied, not only written to config.toml
    sets = ["num_epochs=2", "train.learning_rate=1e-3", "train.adam_beta1=0.5"]
    args = ["train", "--resume", str(out), "--quiet"]
    assert main([*args, *(x for s in sets for x in ("--set", s))]) == 0
    assert "lr 0.02 -> 0.001" in capsys.readouterr().out
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    (group,) = state["optimizer"]["tree"]["param_groups"]
    assert group["lr"] == 1e-3
    assert group["betas"] == {"__json_tuple__": [0.5, 0.999]}


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A 2-epoch run with both checkpoints, made once: each damage below spoils a copy."""
    tmp = tmp_path_factory.mktemp("two-epochs")
    train(tiny_config(tmp, "num_epochs=2", *SHORT), show_progress=False)
    return tmp / "run"


@pytest.mark.xdist_group("two_epochs")  # one worker builds the module fixture
@pytest.mark.parametrize(
    "damage",
    [
        "truncate_adapter",
        "zero_fill_adapter",
        "delete_adapter",
        "zero_optimizer",
        "flip_bytes",
        "nan_weights",
        "missing_key",
        "extra_key",
        "wrong_shape",
        "edit_optimizer_state",
        "edit_epoch",
    ],
)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, two_epochs, damage, capsys):
    """Resume verifies the newest checkpoint (SHA-256 of its files, finite weights, the epoch it
    records) and, when it is damaged, continues from the one before it instead of a traceback or
    a silently wrong run; with every checkpoint damaged it stops in one line."""
    from safetensors.torch import save_file

    from ddpo_lite.cli import main

    out = tmp_path / "run"
    shutil.copytree(two_epochs, out)
    newest = latest_checkpoint(out)
    adapter = newest / "adapter.safetensors"
    if damage == "truncate_adapter":
        adapter.write_bytes(adapter.read_bytes()[:100])
    elif damage == "zero_optimizer":
        path = newest / "optimizer.safetensors"
        path.write_bytes(bytes(len(path.read_bytes())))
    elif damage == "flip_bytes":
        data = bytearray(adapter.read_bytes())
        for i in range(len(data) - 64, len(data)):
            data[i] ^= 0xFF
        adapter.write_bytes(bytes(data))
    elif damage == "zero_fill_adapter":
        adapter.write_bytes(bytes(len(adapter.read_bytes())))
    elif damage == "delete_adapter":
        adapter.unlink()
    elif damage in ("nan_weights", "missing_key", "extra_key", "wrong_shape"):
        # rewritten whole and the hashes dropped, so that only the tensor checks can tell
        tensors = load_file(adapter)
        first = next(iter(tensors))
        if damage == "nan_weights":
            tensors[first].fill_(float("nan"))
        elif damage == "missing_key":
            del tensors[first]
        elif damage == "extra_key":
            tensors[first.replace("lora_A", "lora_Z")] = tensors[first].clone()
        else:
            tensors[first] = torch.zeros(tensors[first].shape[0] + 1, tensors[first].shape[1])
        save_file(tensors, adapter)
        state = json.loads((newest / "state.json").read_text())
        state.pop("sha256")
        (newest / "state.json").write_text(json.dumps(state))
    elif damage == "edit_optimizer_state":
        state = json.loads((newest / "state.json").read_text())
        state["optimizer"] = {"tree": {"state": {}, "param_groups": "edited"}}
        state.pop("sha256")
        (newest / "state.json").write_text(json.dumps(state))
    else:
        state = json.loads((newest / "state.json").read_text())
        state["epoch"] = 7
        (newest / "state.json").write_text(json.dumps(state))

    with pytest.warns(UserWarning, match="trying the checkpoint before it"):
        result = train(tiny_config(tmp_path, "num_epochs=3", *SHORT), resume=True)
    assert [row["epoch"] for row in result.metrics] == [1, 2, 3]  # epoch 2 redone
    assert "resuming from epoch_0001" in capsys.readouterr().out

    # every checkpoint damaged: one line, exit 2, no traceback
    for folder in list_checkpoints(out):
        (folder / "rng.safetensors").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="trying the checkpoint before it"):
        code = main(["train", "--resume", str(out), "--quiet", "--set", "num_epochs=4"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "Traceback" not in err


def test_leftovers_of_a_crash_are_cleaned_and_a_half_done_lora_swap_repaired(tmp_path):
    """A kill mid-save leaves hidden temporary folders (checkpoints/.epoch_NNNN-*, .lora-*); a
    kill mid-swap leaves no lora/ but the previous one in .lora-old. The next start removes the
    temporaries and, on resume, puts the previous LoRA back."""
    out = tmp_path / "run"
    train(tiny_config(tmp_path, "num_epochs=1", *SHORT), show_progress=False)
    saved = _lora(out)
    half_checkpoint = out / "checkpoints" / ".epoch_0002-k3j4h5"
    half_lora = out / ".lora-a1b2c3"
    half_best = out / ".best_lora-x9y8z7"
    for folder in (half_checkpoint, half_lora, half_best):
        folder.mkdir()
        (folder / "adapter.safetensors").write_bytes(b"half written")
    os.rename(out / "lora", out / ".lora-old")  # killed between the swap's two renames

    with pytest.warns(UserWarning, match="restored the previous one from .lora-old"):
        train(tiny_config(tmp_path, "num_epochs=1", *SHORT), resume=True, show_progress=False)
    assert not any(p.exists() for p in (half_checkpoint, half_lora, half_best))
    assert not (out / ".lora-old").exists()
    restored = _lora(out)
    assert restored.keys() == saved.keys()
    assert all(torch.equal(restored[k], saved[k]) for k in saved)

    # a new run over the folder (--overwrite) removes the leftovers too, and restores nothing
    (out / ".lora-old").mkdir()
    (out / "checkpoints").mkdir(exist_ok=True)
    half_checkpoint.mkdir()
    train(tiny_config(tmp_path, "num_epochs=1", *SHORT), overwrite=True, show_progress=False)
    assert not (out / ".lora-old").exists() and not half_checkpoint.exists()


def test_resume_refuses_user_code_its_config_names_unless_confirmed(tmp_path, capsys, monkeypatch):
    """A run folder may come from someone else: `--resume DIR` whose config.toml names a
    'file.py:fn' reward says so in one line and imports nothing, unless --trust-reward-code is
    given or the command line names that reward again."""
    import ddpo_lite.trainer
    from ddpo_lite.cli import main
    from ddpo_lite.config import to_toml

    marker = tmp_path / "ran.txt"
    code = tmp_path / "evil.py"
    code.write_text(
        "import pathlib\n"
        "import numpy as np\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "def score(images, prompts, metadata):\n"
        "    return np.zeros(len(images)), {}\n"
    )
    run = tmp_path / "run"
    run.mkdir()
    spec = f"{code}:score"
    config = tiny_config(tmp_path, "num_epochs=1", *SHORT, f'reward.name="{spec}"')
    (run / "config.toml").write_text(to_toml(config))

    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "names Python code as the reward" in err and "--trust-reward-code" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not marker.exists()
    # weights name code too
    (run / "config.toml").write_text(
        to_toml(config).replace("weights = {}", f'weights = {{"{spec}" = 1.0}}')
    )
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert "names Python code" in capsys.readouterr().err and not marker.exists()
    (run / "config.toml").write_text(to_toml(config))

    # named again on the command line: no refusal (train itself stubbed out here)
    called = []

    def fake_train(config, **kwargs):
        called.append(config.reward.name)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ddpo_lite.trainer, "train", fake_train)
        args = ["train", "--resume", str(run), "--quiet", "--set", f"reward.name={spec}"]
        assert main(args) == 130
    assert called == [spec]

    # confirmed: the run goes ahead and the reward runs
    assert main(["train", "--resume", str(run), "--quiet", "--trust-reward-code"]) == 0
    assert marker.read_text() == "imported"


@pytest.mark.parametrize("fails", ["checkpoint", "lora"])
def test_disk_full_stops_in_one_line_and_resume_continues(tmp_path, capsys, monkeypatch, fails):
    """ENOSPC while saving (the checkpoint's tensors, or the user-facing LoRA) stops the run with
    one line naming what failed and how to continue; the previous checkpoint is intact, nothing
    half-written is left, and --resume then finishes the run."""
    import errno

    import ddpo_lite.checkpoint
    import ddpo_lite.trainer
    from ddpo_lite.cli import main

    out = tmp_path / "run"
    module, name = (
        (ddpo_lite.checkpoint, "save_file")
        if fails == "checkpoint"
        else (
            ddpo_lite.trainer,
            "save_lora",
        )
    )
    real, calls = getattr(module, name), []

    def full_disk(*args, **kwargs):
        calls.append(1)
        # checkpoint: 3 tensor files per save; lora: 1 call per save (the LoRA of epoch 2 fails)
        if len(calls) > (3 if fails == "checkpoint" else 1):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    sets = [x for s in ["num_epochs=2", *SHORT] for x in ("--set", s)]
    with monkeypatch.context() as patch:
        patch.setattr(module, name, full_disk)
        code = main(["train", "--preset", "tiny", "--output", str(out), "--quiet", *sets])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    what = "the checkpoint of epoch 2" if fails == "checkpoint" else "the LoRA of epoch 2 (lora/)"
    assert f"writing {what} failed: No space left on device" in err
    intact = "epoch_0001" if fails == "checkpoint" else "epoch_0002"
    assert f"the last checkpoint, {intact}, is intact" in err and f"--resume {out}" in err
    assert [p.name for p in list_checkpoints(out)] == ["epoch_0001", "epoch_0002"][
        : 1 if fails == "checkpoint" else 2
    ]
    assert not list((out / "checkpoints").glob(".*")) and not list(out.glob(".lora-*"))
    assert _lora(out)  # the LoRA of epoch 1 still loads

    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert [row["epoch"] for row in _rows(out)] == [1, 2]
    # lora/ is the last checkpoint's, even where no epoch was left to run (the LoRA failed)
    assert json.loads((out / "lora" / "ddpo_lite.json").read_text())["epoch"] == 2
    saved = load_file(latest_checkpoint(out) / "lora" / LORA_WEIGHT_NAME)
    assert all(torch.equal(saved[k], v) for k, v in _lora(out).items())


def test_a_damaged_metrics_file_is_kept_and_said_on_resume(tmp_path):
    """Lines of metrics.jsonl that are not rows (cut short, edited, not JSON) are not dropped in
    silence: resume warns with their count and keeps the file as it was beside it."""
    from ddpo_lite.run_files import metrics_before

    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"epoch": e, "reward_mean": 0.5}) for e in (1, 2, 3)]
    path.write_text("\n".join([good[0], '{"epoch": 2, "rew', good[2], "[1, 2]", ""]) + "\n")
    with pytest.warns(UserWarning, match="2 line.*metrics.jsonl.damaged"):
        rows = metrics_before(path, 3)
    assert [row["epoch"] for row in rows] == [1, 3]
    assert (tmp_path / "metrics.jsonl.damaged").read_text() == path.read_text()
    path.write_text("\n".join(good) + "\n")  # an intact file: no warning, no copy made anew
    (tmp_path / "metrics.jsonl.damaged").unlink()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [row["epoch"] for row in metrics_before(path, 2)] == [1, 2]
    assert not (tmp_path / "metrics.jsonl.damaged").exists()


def test_each_resume_that_changes_settings_is_kept_in_config_toml():
    import tomllib

    from ddpo_lite.run_files import resumed_config

    first = "num_epochs = 2\n\n[model]\nmax_sequence_length = 512\n[reward]\nweights = {a = 1}\n"
    same, changed = resumed_config(first, first, 2)
    assert (same, changed) == (first, [])  # a plain resume: the file as it was, nothing said

    second = first.replace("= 2", "= 4").replace("512", "256")
    text, changed = resumed_config(first, second, 2)
    assert changed == ["num_epochs 2 -> 4", "model.max_sequence_length 512 -> 256"]
    third = second.replace("{a = 1}", "{a = 1, b = 2}")
    text, changed = resumed_config(text, third, 4)
    assert changed == ["reward.weights.b '(unset)' -> 2"]
    assert text.splitlines()[:2] == [
        "# resumed at epoch 2 with num_epochs 2 -> 4, model.max_sequence_length 512 -> 256",
        "# resumed at epoch 4 with reward.weights.b '(unset)' -> 2",
    ]
    assert tomllib.loads(text) == tomllib.loads(third)
    assert resumed_config("num_epochs = [", third, 6) == (third, [])  # damaged: rewritten whole


OOM_REWARD = """
import torch

calls = []


def reward(images, prompts, metadata):
    calls.append(1)
    if len(calls) > 1:  # the second epoch's batch (one batch per epoch)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return [0.0] * len(images), {}
"""


@pytest.mark.parametrize("phase", ["sampling and scoring", "training"])
def test_out_of_memory_stops_in_one_line_naming_the_phase_and_resume_continues(
    tmp_path, capsys, monkeypatch, phase
):
    """An out-of-memory error in epoch 2 (in the reward's thread, or in the update) stops the run
    with one line: where, that epoch 1's checkpoint is intact, how to continue with less memory
    (the levers this config has off); --resume then finishes the run."""
    import ddpo_lite.trainer
    from ddpo_lite.cli import main

    out = tmp_path / "run"
    sets = ["num_epochs=2", *SHORT]
    if phase == "sampling and scoring":
        (tmp_path / "oom_reward.py").write_text(OOM_REWARD)
        sets.append(f"reward.name='{tmp_path / 'oom_reward.py'}:reward'")
    else:
        real, calls = ddpo_lite.trainer.update, []

        def update(*args, **kwargs):
            calls.append(1)
            if len(calls) > 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(*args, **kwargs)

        monkeypatch.setattr(ddpo_lite.trainer, "update", update)
    args = ["train", "--preset", "tiny", "--output", str(out), "--quiet"]
    assert main([*args, *(x for s in sets for x in ("--set", s))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"out of memory in epoch 2 ({phase})" in err
    assert "the last checkpoint, epoch_0001, is intact" in err and f"--resume {out}" in err
    # the levers for that phase the config has off: the tiny preset trains all its timesteps in
    # one pass without checkpointing, and samples with the reward and its chains on the device
    if phase == "training":
        assert "memory.gradient_checkpointing=true" in err and "train.timestep_chunk=1" in err
        assert "memory.offload_vae=true" in err  # the VAE waits idle while the LoRA trains
    else:
        assert "memory.offload_reward=true" in err and "offload_trajectory=true" in err
        assert "train.timestep_chunk" not in err
    assert [p.name for p in list_checkpoints(out)] == ["epoch_0001"]

    monkeypatch.undo()
    resume = ["train", "--resume", str(out), "--quiet"]
    if phase == "sampling and scoring":
        resume += ["--set", "reward.name='jpeg_compressibility'"]
    assert main(resume) == 0
    assert [row["epoch"] for row in _rows(out)] == [1, 2]


def test_out_of_memory_on_a_gpu_says_what_the_card_held(tmp_path, monkeypatch):
    """The CUDA branch, on figures a card would report: its size, PyTorch's peak, memory the
    allocator holds unused (fragmentation), and a --vram budget below the card."""
    from ddpo_lite.trainer import out_of_memory_message

    GiB = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1 * GiB, 12 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 8 * GiB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 11 * GiB)
    config = tiny_config(tmp_path, "memory.gradient_checkpointing=true")
    text = out_of_memory_message("training", 3, config, torch.device("cuda"))
    assert text.startswith("out of GPU memory in epoch 3 (training): the card has 12.0 GiB, ")
    assert "PyTorch held up to 11.0 GiB (2.0 GiB of it reserved but free" in text
    assert "expandable_segments:True" in text
    assert "before its first checkpoint" in text and "--overwrite --vram 10`" in text
    assert "memory.gradient_checkpointing" not in text  # on already: not suggested
