"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: one short epoch, then
each rank writes the LoRA it holds to OUT/rank{R}.safetensors, and to OUT/rank{R}.json how many
DDP models were alive when the process group was destroyed (0: see trainer.drop_ddp_wrapper).
With the override `reward.name="ddp_worker:failing_reward"` the run fails in its first reward
and the rank writes only the JSON."""

import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ddpo_lite.config import load_config
from ddpo_lite.rewards.compose import RewardError
from ddpo_lite.trainer import train

_destroy = dist.destroy_process_group
live_at_destroy: list[int] = []


def destroy_counting_ddp(*args, **kwargs):
    """destroy_process_group, counting the DDP models still alive just before it."""
    gc.collect()
    ddp = torch.nn.parallel.DistributedDataParallel
    live_at_destroy.append(sum(isinstance(o, ddp) for o in gc.get_objects()))
    return _destroy(*args, **kwargs)


def failing_reward(images, prompts, metadata):
    raise ValueError("a reward that fails on purpose")


def main(out: Path, *overrides: str) -> None:
    config = load_config("tiny", [f'output_dir="{out / "run"}"', *overrides])
    rank = int(os.environ.get("RANK", "0"))
    dist.destroy_process_group = destroy_counting_ddp  # accelerate calls it by this name
    try:
        result = train(config)
    except RewardError:
        result = None
    (out / f"rank{rank}.json").write_text(json.dumps({"live_ddp_at_destroy": live_at_destroy}))
    assert not dist.is_initialized(), "train() must end by destroying the process group"
    if result is None:
        return
    pipe = result.pipeline
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    lora = {
        k: v.detach().float().contiguous() for k, v in denoiser.state_dict().items() if "lora_" in k
    }
    save_file(lora, str(out / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), *sys.argv[2:])
