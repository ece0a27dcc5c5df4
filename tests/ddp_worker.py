"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: one short epoch, then
each rank writes the LoRA it holds to OUT/rank{R}.safetensors."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ddpo_lite.config import load_config
from ddpo_lite.trainer import train


def main(out: Path, *overrides: str) -> None:
    config = load_config("tiny", [f'output_dir="{out / "run"}"', *overrides])
    result = train(config)
    rank = int(os.environ.get("RANK", "0"))  # train() ends by destroying the process group
    pipe = result.pipeline
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    lora = {
        k: v.detach().float().contiguous() for k, v in denoiser.state_dict().items() if "lora_" in k
    }
    save_file(lora, str(out / f"rank{rank}.safetensors"))
    assert not dist.is_initialized(), "train() must end by destroying the process group"


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), *sys.argv[2:])
