"""LoRA on the UNet through peft, as diffusers' own LoRA training script does it, and saving it
in the format `pipe.load_lora_weights(folder)` reads with no extra code."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_module_names(unet: torch.nn.Module) -> list[str]:
    """The names `lora.target_modules` can use: for every Linear/Conv2d of `unet`, the shortest
    suffix of its dotted name that is not just a number (to_q, to_out.0, proj_in, net.2, ...)."""
    names = set()
    for full, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            parts = full.split(".")
            cut = len(parts) - 1
            while cut > 0 and parts[cut].isdigit():
                cut -= 1
            names.add(".".join(parts[cut:]))
    return sorted(names)


def check_target_modules(unet: torch.nn.Module, target_modules: list[str]) -> None:
    """Every entry of `target_modules` must name a module of `unet` as peft matches them (the
    module's full name, or its last dotted parts); otherwise a ConfigError lists the names there
    are. peft itself ignores an entry that matches nothing as long as another one matches."""
    from ddpo_lite.config import ConfigError

    full_names = [name for name, _ in unet.named_modules()]
    unknown = [
        t for t in target_modules if not any(n == t or n.endswith("." + t) for n in full_names)
    ]
    if unknown:
        known = lora_module_names(unet)
        raise ConfigError(
            f"lora.target_modules: {', '.join(map(repr, unknown))} matches no module of the "
            f"{type(unet).__name__}; its Linear/Conv2d modules are named {', '.join(known)} "
            '(the default is ["to_k", "to_q", "to_v", "to_out.0"])'
        )


def attach_lora(unet: torch.nn.Module, rank: int, alpha: float, target_modules: list[str]) -> list:
    """Freeze the UNet, add a peft LoRA adapter, make its parameters fp32; returns them.

    Base weights keep whatever dtype they were cast to (fp16/bf16 under the half_base lever).
    Raises ConfigError when an entry of `target_modules` names no module of the UNet.
    """
    check_target_modules(unet, target_modules)
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules
    )
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"lora.target_modules {target_modules} matched no module of the UNet")
    for p in params:
        p.data = p.data.float()
    return params


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights with diffusers' key names (without the 'unet.' prefix). A UNet's
    go through `convert_state_dict_to_diffusers` as diffusers' UNet LoRA script writes them; a
    transformer's (SD3) stay peft's lora_A / lora_B, as diffusers' SD3 LoRA script saves them and
    `StableDiffusion3Pipeline.load_lora_weights` reads them (converted, its to_q/k/v/out keys
    became lora.down/up while add_*_proj kept lora_A/B, and the loader then took only those)."""
    state = get_peft_model_state_dict(unet)
    if isinstance(unet, UNet2DConditionModel):
        return convert_state_dict_to_diffusers(state)
    return state


def save_lora(
    unet: torch.nn.Module, folder: str | Path, metadata: dict[str, str], family=None
) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` atomically, with peft's adapter config
    (so rank and alpha load back exactly) and `metadata` (base model, preset, ...) in its header.
    `family` (default SD 1.x) names the pipeline class whose `save_lora_weights` writes it: the
    file is what that pipeline's `load_lora_weights` reads."""
    pipeline_class = family.pipeline_class if family is not None else StableDiffusionPipeline
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        state = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(unet).items()}
        adapter_config = unet.peft_config["default"].to_dict()
        where = family.denoiser_name if family is not None else "unet"  # "unet" / "transformer"
        pipeline_class.save_lora_weights(
            tmp,
            **{f"{where}_lora_layers": state, f"{where}_lora_adapter_metadata": adapter_config},
            safe_serialization=True,
        )
        path = tmp / LORA_WEIGHT_NAME
        with safe_open(path, framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        header.update({f"ddpo_lite.{k}": str(v) for k, v in metadata.items()})
        save_file(tensors, path, metadata=header)
        (tmp / "ddpo_lite.json").write_text(json.dumps(metadata, indent=2) + "\n")
        respect_umask(tmp)  # mkdtemp made it 0700, safetensors its files 0600
        if folder.exists():
            old = folder.with_name(f".{folder.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / LORA_WEIGHT_NAME


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def respect_umask(path: str | Path) -> None:
    """Give `path` (a file, or a folder and everything in it) the permissions a plain `open` or
    `mkdir` would have: 0666 / 0777 less the umask. tempfile and safetensors create them
    owner-only (0600 / 0700), which would hide a LoRA from the other users of a machine."""
    path = Path(path)
    mask = _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def read_lora_metadata(path: str | Path) -> dict[str, str]:
    """The ddpo-lite fields of a saved LoRA's safetensors header (folder or file)."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
    prefix = "ddpo_lite."
    return {k[len(prefix) :]: v for k, v in header.items() if k.startswith(prefix)}
