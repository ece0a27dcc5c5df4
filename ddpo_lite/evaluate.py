"""Held-out evaluation: the policy's reward on prompt groups the run never trains on.

Every evaluation draws prompt j's images from `torch.Generator().manual_seed(seed + j)`, so two
evaluations (of one LoRA, of successive epochs, of the base and a LoRA) start from the same noise
and their numbers are comparable; evaluating the same weights twice gives identical numbers.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from ddpo_lite.config import ConfigError
from ddpo_lite.drift import diversity
from ddpo_lite.grid import make_grid
from ddpo_lite.policy import Policy
from ddpo_lite.sampling import rollout


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and '#' comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"evaluation prompt file {str(path)!r} does not exist")
    lines = (line.strip() for line in path.read_text().splitlines())
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ConfigError(f"evaluation prompt file {str(path)!r} holds no prompts")
    return prompts


def load_groups(files: dict[str, str], max_prompts: int = 0) -> dict[str, list[str]]:
    """{group: prompts} from {group: file}; at most `max_prompts` per group (0 = all)."""
    groups = {}
    for name, file in files.items():
        prompts = read_prompt_file(file)
        groups[name] = prompts[:max_prompts] if max_prompts else prompts
    return groups


@dataclass
class GroupResult:
    prompts: list[str]
    rewards: np.ndarray  # (num_prompts, num_per_prompt)
    diversity: float
    images: list = field(default_factory=list)  # the first image of each prompt

    @property
    def mean(self) -> float:
        return float(np.nanmean(self.rewards))

    @property
    def std(self) -> float:
        return float(np.nanstd(self.rewards))


@torch.no_grad()
def evaluate(
    policy: Policy,
    groups: dict[str, list[str]],
    reward,
    *,
    num_per_prompt: int,
    seed: int,
    advance: Callable[[], None] = lambda: None,
) -> dict[str, GroupResult]:
    """Sample `num_per_prompt` images per prompt of every group from `policy` with fixed noise
    and score them; `advance` is called after each prompt (a progress bar's step)."""
    results = {}
    for name, prompts in groups.items():
        rewards, images, all_images, all_prompts = [], [], [], []
        for j, prompt in enumerate(prompts):
            texts = [prompt] * num_per_prompt
            batch, _ = rollout(
                policy,
                texts,
                torch.zeros(num_per_prompt, dtype=torch.long),
                torch.Generator().manual_seed(seed + j),
                record=False,  # images only (the same draws as a recording rollout)
            )
            values, _ = reward(batch, texts, [{} for _ in batch])
            rewards.append(np.asarray(values, dtype=np.float64))
            images.append(batch[0])
            all_images += batch
            all_prompts += texts
            advance()
        results[name] = GroupResult(
            prompts=list(prompts),
            rewards=np.stack(rewards),
            diversity=diversity(all_images, all_prompts),
            images=images,
        )
    return results


def eval_metrics(results: dict[str, GroupResult]) -> dict[str, float]:
    """Flat metrics: eval_<group>_reward_mean/std, eval_<group>_diversity, eval_reward_mean."""
    row: dict[str, float] = {}
    for name, group in results.items():
        row[f"eval_{name}_reward_mean"] = group.mean
        row[f"eval_{name}_reward_std"] = group.std
        row[f"eval_{name}_diversity"] = group.diversity
    all_rewards = np.concatenate([g.rewards.ravel() for g in results.values()])
    row["eval_reward_mean"] = float(np.nanmean(all_rewards))
    return row


def save_eval_grid(results: dict[str, GroupResult], path: Path, per_group: int = 8) -> None:
    """The first image of up to `per_group` prompts per group, with group, prompt and reward."""
    images, captions = [], []
    for name, group in results.items():
        for prompt, image, values in zip(
            group.prompts[:per_group], group.images, group.rewards, strict=False
        ):
            images.append(image)
            captions.append(f"[{name}] {prompt}\nreward {values[0]:.4g}")
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, captions).save(path)


def save_before_after_grid(
    base: dict[str, GroupResult],
    tuned: dict[str, GroupResult],
    path: Path,
    epoch: int,
    per_group: int = 8,
) -> None:
    """Base and tuned images of the same prompts and noise, side by side (before | after), for up
    to `per_group` prompts per group: the change a run made, at fixed seeds."""
    images, captions = [], []
    for name, group in tuned.items():
        before = base[name]
        for j, prompt in enumerate(group.prompts[:per_group]):
            images += [before.images[j], group.images[j]]
            captions += [
                f"{prompt}\nbase: {before.rewards[j][0]:.4g}",
                f"{prompt}\nepoch {epoch}: {group.rewards[j][0]:.4g}",
            ]
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, captions, columns=4).save(path)


def compare(base: dict[str, GroupResult], tuned: dict[str, GroupResult]) -> list[dict]:
    """Per group: base and tuned means, their paired difference and its standard error (the
    same noise for both, so the differences pair up image by image)."""
    rows = []
    for name in base:
        diff = (tuned[name].rewards - base[name].rewards).ravel()
        diff = diff[np.isfinite(diff)]
        se = float(np.std(diff, ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
        rows.append(
            {
                "group": name,
                "n": int(len(diff)),
                "base": base[name].mean,
                "tuned": tuned[name].mean,
                "difference": float(np.mean(diff)) if len(diff) else float("nan"),
                "standard_error": se,
            }
        )
    return rows


def run_config_beside(lora: str | Path):
    """The config of the run that wrote `lora` (its folder OUTPUT/lora or OUTPUT/best_lora, or a
    file inside one): OUTPUT/config.toml, or None where there is none or it does not load."""
    from ddpo_lite.config import load_config

    path = Path(lora).expanduser()
    folder = path if path.is_dir() else path.parent
    config_file = folder.parent / "config.toml"
    if not config_file.is_file():
        return None
    try:
        return load_config(str(config_file))
    except ConfigError:
        return None


def _reward_config(metadata: dict, run, reward_name: str | None):
    """The reward to score with: `reward_name`, else the one recorded in the LoRA, else its run's."""
    from ddpo_lite.config import RewardConfig, config_from_dict

    if reward_name:
        return RewardConfig(name=reward_name)
    if metadata.get("reward_kind") == "function":
        raise ConfigError(
            f"the LoRA was trained on {metadata.get('reward')}, which cannot be rebuilt here: "
            "pass --reward NAME (a registered reward or 'module:function')"
        )
    if metadata.get("reward_config"):
        recorded = config_from_dict({"reward": json.loads(metadata["reward_config"])}).reward
    elif run is not None:
        recorded = run.reward
    else:
        recorded = RewardConfig(name=metadata.get("reward", ""))
    _refuse_recorded_code(recorded)
    return recorded


def _refuse_recorded_code(reward) -> None:
    """A reward read from a LoRA file or a run folder may name Python code ('file.py:fn',
    'module:fn') or a server that would receive the images: neither is used unless the user
    names it on the command line (a LoRA from a model site is not code to run)."""
    names = [reward.name, *reward.weights]
    code = [n for n in names if ":" in n]
    if code:
        raise ConfigError(
            f"the LoRA's run used the reward {code[0]!r}, Python code named in a file, which "
            f"ddpo-lite does not run on its own: pass --reward {code[0]!r} if you trust it, or "
            "another --reward"
        )
    if reward.url:
        raise ConfigError(
            f"the LoRA's run scored through the reward server {reward.url!r}; ddpo-lite does "
            "not send images to an address read from a file: pass --reward NAME"
        )


def place_for_eval(pipe, device: str, offload: bool) -> None:
    """The pipeline's models on `device`; with `offload` the text encoders stay on the CPU (the
    prompt encoder brings them to the device to encode each new prompt and back, as training's
    `memory.offload_text_encoder`), so the card holds the denoiser, the VAE and the reward."""
    from ddpo_lite.families import family_of

    if not offload:
        pipe.to(device)
        return
    kind = torch.device(device).type
    stay = {id(m) for m in family_of(pipe).text_encoders(pipe)}
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module) or id(component) in stay:
            continue
        if any(p.device.type != kind for p in component.parameters()):  # not bitsandbytes'
            component.to(device)


def evaluate_lora(
    lora: str | Path | None,
    *,
    model: str | None = None,
    prompt_files: dict[str, str] | None = None,
    reward_name: str | None = None,
    num_per_prompt: int | None = None,
    seed: int | None = None,
    steps: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    quantize: str | None = None,
    offload: bool | None = None,
    progress: Progress | None = None,
    scale: float = 1.0,
) -> tuple[dict[str, GroupResult], dict[str, GroupResult] | None]:
    """Evaluate the base model and, with `lora`, the tuned one on the same noise.

    Defaults are the run's own: the LoRA's metadata (base model, reward as trained: a weighted
    sum, a reward server, ...; steps, guidance, eta, resolution, a flow model's text tokens) and
    the evaluation settings (`[eval]` prompt groups, num_per_prompt, max_prompts, seed) of the
    run's config.toml beside the LoRA folder, else of its preset, else 4 images per prompt and
    seed 20231. Runs on `device` (None: the GPU where there is one) with weights in `dtype` (as
    `ddpo-lite sample`: "auto" is bf16 or fp16 on a GPU, fp32 on the CPU), under autocast when
    they are not fp32, the frozen denoiser stored as `quantize` (None: as the LoRA was trained,
    on a GPU), the text encoders on the CPU but while they encode with `offload` (None: where
    the models do not all fit on the GPU), a bar per model on `progress`, the LoRA at
    strength `scale` (1: as trained). Returns (base results, tuned results or None).
    """
    from ddpo_lite.config import Config, EvalConfig, load_config
    from ddpo_lite.families import family_of
    from ddpo_lite.rewards.compose import build_reward
    from ddpo_lite.sample import (
        inference_device,
        inference_dtype,
        load_base,
        load_with_lora,
        offload_needed,
        trained_quantization,
    )
    from ddpo_lite.trainer import make_policy

    device = inference_device(device)
    weights = inference_dtype(dtype, device)
    if lora is not None:
        quantize = quantize or trained_quantization(lora, device)
        pipe, metadata = load_with_lora(lora, model, weights, quantize, scale)
    elif model:
        pipe, metadata = load_base(model, weights, quantize or "none"), {}
    else:
        raise ConfigError("give a LoRA, or a --model to evaluate the base model alone")
    offload = offload_needed(pipe, device, offload)
    place_for_eval(pipe, device, offload)
    if weights == torch.float16 and family_of(pipe).vae_fp32_in_fp16:
        pipe.vae.to(dtype=torch.float32)  # SDXL's VAE overflows in fp16, as in training
    autocast = contextlib.nullcontext
    if weights != torch.float32:
        kind = torch.device(device).type

        def autocast():
            return torch.autocast(kind, dtype=weights)

    run = run_config_beside(lora) if lora is not None else None
    settings_from = run.eval if run is not None else None
    preset = metadata.get("preset")
    if settings_from is None and preset:
        try:
            settings_from = load_config(preset).eval
        except ConfigError:
            settings_from = None
    run_eval = settings_from or EvalConfig()
    max_prompts = 0
    if not prompt_files:
        prompt_files = run_eval.prompts
        max_prompts = run_eval.max_prompts
        if not prompt_files:
            raise ConfigError(
                "no evaluation prompts: pass --prompts FILE (the LoRA's run and its preset "
                f"{str(preset or 'unknown')!r} name none)"
            )
    groups = load_groups(prompt_files, max_prompts)
    reward = build_reward(_reward_config(metadata, run, reward_name), device=device)
    sampling = Config()  # the run's sampling settings: from its LoRA's metadata
    sampling.sample.num_steps = steps or int(metadata.get("num_steps", 50))
    sampling.sample.guidance_scale = float(metadata.get("guidance_scale", 5.0))
    sampling.sample.eta = float(metadata.get("eta", 1.0))
    sampling.sample.resolution = int(metadata.get("resolution", 0))
    sampling.model.max_sequence_length = int(metadata.get("max_sequence_length", -1))
    sampling.memory.offload_text_encoder = offload  # on the GPU only while they encode
    policy = make_policy(pipe, sampling, device, autocast=autocast)
    settings = dict(
        num_per_prompt=num_per_prompt or run_eval.num_per_prompt,
        seed=run_eval.seed if seed is None else seed,
    )
    prompts = sum(len(group) for group in groups.values())

    def bar(description: str) -> Callable[[], None]:
        if progress is None:
            return lambda: None
        task = progress.add_task(description, total=prompts)
        return lambda: progress.advance(task)

    if lora is None:
        return evaluate(policy, groups, reward, **settings, advance=bar("base model")), None
    pipe.disable_lora()
    base = evaluate(policy, groups, reward, **settings, advance=bar("base model"))
    pipe.enable_lora()
    tuned = evaluate(policy, groups, reward, **settings, advance=bar("with the LoRA"))
    return base, tuned
