"""Two CPU processes (torchrun, gloo) train one epoch: both must hold the same LoRA, and it must
differ from the LoRA one process trains on only its own half of the data, so the gradients
really were averaged across processes. The same for the other paths through the update: GRPO
on a flow model with the KL to the base (a forward with the LoRA off inside the DDP model) and
the one-step log-prob-free update (NFT: the whole epoch accumulated under no_sync)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")
OVERRIDES = [
    "num_epochs=1",
    "sample.num_steps=3",
    "sample.batch_size=4",
    "sample.num_batches_per_epoch=1",
    "train.batch_size=2",
    "train.gradient_accumulation=2",
    "train.learning_rate=1e-2",
]


#: torchrun's own free port (--standalone: its rendezvous binds port 0 itself), so that two runs
#: never race for a port picked beforehand; the runs are one xdist group (one at a time).
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
pytestmark = pytest.mark.xdist_group("torchrun")


def run(command: list[str], out: Path, timeout: float = 300) -> None:
    """Run `command`; a run past `timeout` is killed with its workers and its output shown."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own: kill them by ancestry, not group
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=30)
        pytest.fail(f"{command[2:5]} ran past {timeout:.0f} s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]


def _no_ddp_model_outlives_the_group(out: Path) -> None:
    """Each rank destroyed its process group once, with no DDP model alive (one alive there
    can hang the rank in the group's destructor: trainer.drop_ddp_wrapper)."""
    for rank in (0, 1):
        counts = json.loads((out / f"rank{rank}.json").read_text())["live_ddp_at_destroy"]
        assert counts == [0], (rank, counts)


def _two_ranks(tmp_path, overrides: list[str]) -> dict[str, torch.Tensor]:
    out = tmp_path / "two"
    out.mkdir()
    run([*TORCHRUN, str(WORKER), str(out), *overrides], out)
    _no_ddp_model_outlives_the_group(out)
    # both processes really ran: one LoRA file per rank
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == [
        "rank0.safetensors",
        "rank1.safetensors",
    ]
    rank0 = load_file(out / "rank0.safetensors")
    rank1 = load_file(out / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for key in rank0:  # each rank sampled its own prompts and noise: equal only if averaged
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k)
    return rank0


@pytest.mark.slow
def test_two_processes_average_gradients(tmp_path):
    pytest.importorskip("torch.distributed.run")
    rank0 = _two_ranks(tmp_path, OVERRIDES)
    # one process with rank 0's seed samples rank 0's half only
    one = tmp_path / "one"
    one.mkdir()
    run([sys.executable, str(WORKER), str(one), *OVERRIDES], one)
    alone = load_file(one / "rank0.safetensors")
    differences = [float((alone[k] - rank0[k]).abs().max()) for k in rank0 if "lora_B" in k]
    assert max(differences) > 1e-6


FLOW_GRPO = [
    "model.name=tiny-sd3",
    "sample.eta=0.7",
    "sample.group_size=2",
    "sample.same_initial_noise=false",
    "train.algorithm=grpo",
    "train.kl_coef=0.04",
    "train.batch_size=2",
    "train.gradient_accumulation=2",
]
NFT = [
    "sample.group_size=2",
    "train.algorithm=nft",
    "train.batch_size=2",
]


@pytest.mark.slow
@pytest.mark.parametrize("case", [FLOW_GRPO, NFT], ids=["flow-grpo-kl", "nft"])
def test_two_processes_average_gradients_on_every_update_path(tmp_path, case):
    pytest.importorskip("torch.distributed.run")
    base = [o for o in OVERRIDES if not o.startswith("train.")] + ["train.learning_rate=1e-2"]
    _two_ranks(tmp_path, [*base, *case])


@pytest.mark.slow
def test_a_run_that_fails_on_two_processes_drops_its_ddp_model_before_the_group(tmp_path):
    """The error path: the traceback's frames held the DDP model past the group's end."""
    pytest.importorskip("torch.distributed.run")
    out = tmp_path / "two"
    out.mkdir()
    overrides = [*OVERRIDES, 'reward.name="ddp_worker:failing_reward"']
    run([*TORCHRUN, str(WORKER), str(out), *overrides], out)
    _no_ddp_model_outlives_the_group(out)
    assert not list(out.glob("rank*.safetensors"))  # the run did fail on both ranks
