"""The run's configuration: one typed dataclass tree, presets as sparse TOML deltas.

Layers, later wins: dataclass defaults -> preset (a name in presets/ or a path to a .toml file)
-> `key.sub=value` overrides. An unknown key or a value of the wrong type is an error naming it.
`Config.validate()` checks every range before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# inside the wheel presets/ is ddpo_lite/presets; in a source checkout it is the top-level folder
_PACKAGED_PRESETS = Path(__file__).parent / "presets"
PRESETS_DIR = (
    _PACKAGED_PRESETS if _PACKAGED_PRESETS.is_dir() else Path(__file__).parent.parent / "presets"
)


class ConfigError(ValueError):
    """A configuration value a user gave is wrong; the message says which and what to do."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    """'tiny' (offline, random weights), 'shapes' (offline, pretrained on coloured shapes, shipped
    in the package), a local diffusers folder or a hub id."""
    seed: int = 0
    """Seed of the offline tiny model's weights (only for name = 'tiny')."""
    family: str = "auto"
    """'auto' (from the model's model_index.json), 'sd1' (Stable Diffusion 1.x and 2.x),
    'sdxl' (Stable Diffusion XL), 'sd3' (Stable Diffusion 3 / 3.5, flow matching), 'flux'
    (FLUX.1-dev / -schnell) or 'flux2' (FLUX.2-klein)."""
    max_sequence_length: int = -1
    """Text-encoder tokens of the flow models' prompts (T5 for sd3 and flux, Qwen3 for flux2),
    their pipelines' `max_sequence_length`; -1 = the model's default (SD3 256, FLUX.1 and
    FLUX.2-klein 512, shapes-flow 0). Fewer tokens shorten the transformer's sequence: less
    memory and time, longer prompts cut. At most 512 for T5; 0 (CLIP's tokens alone) only for
    an SD3 model without T5. The UNet families (sd1, sdxl) read CLIP's 77, fixed: leave -1."""


@dataclass
class PromptConfig:
    prompts: list[str] = field(default_factory=lambda: ["a cat", "a dog"])
    """The prompts sampled uniformly for each image; ignored when `file` is set."""
    file: str = ""
    """A text file with one prompt per line (blank lines and '#' lines skipped)."""
    negative_prompt: str = ""


@dataclass
class SampleConfig:
    num_steps: int = 50
    eta: float = 1.0
    guidance_scale: float = 5.0
    batch_size: int = 8
    """Images per sampling batch on each process."""
    num_batches_per_epoch: int = 4
    resolution: int = 0
    """Image side in pixels, a multiple of 8; 0 = the model's native size (512 for SD 1.5, 768
    for SD 2.x, 1024 for SDXL). Smaller sizes save memory and time."""
    group_size: int = 1
    """Images per (prompt, starting noise) group. With > 1, each group's images share their
    prompt and initial latent, and each image's baseline is the mean reward of the rest of its
    group (in place of per-prompt statistics): the reward variance that comes from the prompt
    and the starting noise leaves the gradient. Must divide batch_size."""
    same_initial_noise: bool = True
    """With group_size > 1: a group's images start from one noise (False: each its own, as
    Flow-GRPO samples its groups; the group then shares only the prompt)."""
    sampler: str = "ddim"
    """UNet families: 'ddim' (with sample.eta), or 'dpm-solver' (DPM-Solver++, deterministic,
    for the log-prob-free train.algorithm 'nft' / 'awm' only: fewer steps for the same images)."""
    flow_sampler: str = "sde"
    """Flow models only: 'sde' (Flow-GRPO's ODE-to-SDE step, noise level sample.eta; 0.7 in
    its configs) or 'cps' (coefficient-preserving sampling); samplers/flow_sde.py."""
    sde_window_size: int = 0
    """Only this many consecutive steps are stochastic, recorded and trained (Flow-GRPO-Fast,
    MixGRPO); the rest are deterministic (ODE / eta 0) and keep nothing. 0 = all steps."""
    sde_window_range: int = 1
    """The window's first step is drawn uniformly from 0 .. sde_window_range - 1 for each
    sampling batch (1 = always the first step)."""


@dataclass
class TrainConfig:
    algorithm: str = "ddpo-is"
    """'ddpo-is' (PPO-style clipping), 'ddpo-sf' (score function), 'rwr', 'grpo' (Flow-GRPO:
    PPO clipping on group-normalised advantages, needs sample.group_size > 1; train.kl_coef
    is its KL to the base), or the log-prob-free
    'nft' (DiffusionNFT) and 'awm' (advantage-weighted matching): these keep no trajectory (only
    the final latents), may sample deterministically (sample.eta = 0) and take one optimizer
    step per epoch; docs/ALGORITHM.md."""
    learning_rate: float = 3e-4
    batch_size: int = 1
    """Samples per forward+backward batch on each process."""
    gradient_accumulation: int = 4
    """Sample batches per optimizer step."""
    micro_batch_size: int = 0
    """Samples per forward+backward inside a train batch (0 = the whole batch): the paper's
    batch sizes without the paper's activation memory; the gradient is the same."""
    num_inner_epochs: int = 1
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's timesteps trained on, drawn at random per sample."""
    first_steps: int = 0
    """Train only on the first this many denoising steps (the noisiest, where the layout is
    decided); 0 = all. timestep_fraction then draws from these."""
    timestep_chunk: int = 1
    """Timesteps per forward+backward (0 = all of a sample's trained timesteps at once, whose
    memory grows with steps x batch). The default 1 is the DDPO authors' loop, so a run never
    needs more memory than theirs; a preset sets the largest its card fits (`train --vram`
    picks it), and the gradient is the same at every chunk (tested)."""
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    rwr_weighting: str = "exp"
    """RWR only: 'exp' (weights exp(r / temperature)) or 'sparse' (top quantile)."""
    kl_coef: float = 0.0
    """Weight of a KL(policy || base) penalty in the loss; 0 is the paper's algorithm and costs
    nothing (no base forward)."""
    rwr_temperature: float = 1.0
    rwr_sparse_quantile: float = 0.9
    nft_beta: float = 1.0
    """NFT only: the guidance strength beta mixing the current and the old policy into the
    implicit positive (1-beta) old + beta new and negative (1+beta) old - beta new policies
    (the paper's default 1.0; 0.1 for its OCR and multi-reward runs). The reward maps to the
    optimality probability r = clip(A, +-adv_clip_max) / adv_clip_max / 2 + 1/2."""
    awm_weighting: str = "uniform"
    """AWM only: 'uniform' (the plain denoising error, DDPM's L_simple) or 'ghuber' (the
    authors' default: sigma_t * (error^p - 0) / p, p = awm_power)."""
    awm_power: float = 0.25


@dataclass
class AdvantageConfig:
    per_prompt_stat_tracking: bool = True
    group_baseline: str = "auto"
    """With sample.group_size > 1: 'normalised' ((r - group mean) / (group std + 1e-4), GRPO's),
    'leave-one-out' (r minus the mean of the rest of the group, over the batch's std), or
    'auto' (normalised for grpo, leave-one-out otherwise)."""
    buffer_size: int = 32
    min_count: int = 16


@dataclass
class LoraSettings:
    rank: int = 4
    alpha: float = 4.0
    target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])


@dataclass
class MemoryConfig:
    mixed_precision: str = "fp16"
    """'no', 'fp16' or 'bf16': autocast dtype; frozen weights are stored in it when half_base."""
    half_base: bool = True
    """Store frozen UNet/VAE/text-encoder weights in the mixed-precision dtype (LoRA stays fp32)."""
    gradient_checkpointing: bool = True
    attention: str = "sdpa"
    """'sdpa' (PyTorch scaled_dot_product_attention), 'xformers' or 'math' (plain matmuls)."""
    use_8bit_adam: bool = True
    vae_slicing: bool = True
    offload_text_encoder: bool = True
    """Keep the text encoder on the CPU; it visits the accelerator only to encode new prompts."""
    encode_on_cpu: bool = False
    """Run the text encoders on the CPU (in their frozen dtype) and move only the cached
    embeddings to the accelerator: SD3's T5-XXL (9 GB in bf16) never meets it. Slower setup
    (the prompt list is encoded once); offload_text_encoder's visit is then never made."""
    cpu: bool = False
    """Run on the CPU even where an accelerator is present."""
    offload_reward: bool = False
    """Move the reward model off the accelerator between calls."""
    offload_vae: bool = False
    """Keep the VAE on the CPU; it visits the accelerator only to decode each sampling batch
    (and the evaluation's), so the card does not hold it while the text encoders encode, the
    reward scores, the KL is measured or the LoRA trains (SD 1.x / FLUX: 0.16 GB in half
    precision; SDXL's fp32 VAE 0.31 GB). Costs two copies of its weights per batch."""
    offload_trajectory: bool = False
    """Keep the epoch's sampled chains (x_T .. x_0 of every sample, the epoch's largest tensor:
    0.8 GB for 256 SD 1.5 samples of 50 steps at 512 px) in pinned CPU memory; the update brings
    one micro-batch's at a time to the accelerator (a copy per micro-batch: lossless)."""
    quantize_base: str = "none"
    """Store the frozen denoiser (the LoRA's base) quantized, LoRA in float32 on top (QLoRA):
    'nf4' (bitsandbytes 4-bit NormalFloat, ~0.52 byte/weight) or 'int8' (LLM.int8, 1 byte),
    through diffusers' BitsAndBytesConfig at load (a CUDA GPU and bitsandbytes needed); 'fp8'
    (float8_e4m3fn storage, each layer upcast to the autocast dtype for its matmul: diffusers'
    `enable_layerwise_casting`, any device); 'none'."""
    encode_batch_size: int = 64
    """Prompts per text-encoder forward when the prompt list is encoded at setup. The encoders
    keep hidden states of every layer (FLUX.2's Qwen3: 37 x 512 tokens x 2560 per prompt, 97
    MB in bf16): 8 holds 0.8 GB where 64 holds 6.2 GB, on the GPU or with encode_on_cpu in RAM."""
    compile_blocks: bool = False
    """torch.compile the denoiser's repeated blocks (diffusers' `compile_repeated_blocks`:
    regional compilation, the transformer blocks). The first calls of each shape compile
    (seconds to minutes), later ones run faster; the CPU needs a C++ compiler."""
    drop_t5: bool = False
    """SD3 only: load without the T5-XXL text encoder (4.7B parameters; text_encoder_3=None,
    the pipeline's documented option: its tokens are zeros). Saves the encoder's 9.5 GB visit at
    setup and its load time; prompt following, and text rendering most, get worse."""


@dataclass
class RewardConfig:
    name: str = "jpeg_compressibility"
    """A registered reward (`ddpo-lite rewards`), or your own as 'module:function' or
    'path/to/file.py:function' (a callable (images, prompts, metadata) -> (rewards, info))."""
    weights: dict[str, float] = field(default_factory=dict)
    """A weighted sum of rewards instead of `name`, e.g. {aesthetic = 1.0, jpeg_compressibility = 0.1}."""
    models: dict[str, str] = field(default_factory=dict)
    """A hub id or local path per model-based reward, replacing its default model."""
    url: str = ""
    """Score through a reward server (`ddpo-lite serve-reward`) at this URL instead of in-process."""
    timeout: float = 120.0
    """Reward server only: seconds to wait for one batch's rewards in all (every retry and
    backoff included); a stalled server stops the run within it."""
    retries: int = 3
    """Reward server only: attempts after the first, with exponential backoff (or a 429/503's
    longer Retry-After), before the run stops."""
    backoff: float = 1.0
    """Reward server only: seconds before the first retry; doubled before each next one."""
    overlap: bool = True
    """Score each sampled batch in a worker thread while the next batch is sampled."""
    local_timeout: float = 600.0
    """In-process rewards: seconds one batch's reward call may take before the run stops (a
    reward that never returns); a reward server's wait is bounded by `timeout`."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate on the held-out prompts every this many epochs (0 = never); also once before
    the first epoch, as the baseline, and after the last."""
    prompts: dict[str, str] = field(default_factory=dict)
    """Prompt groups: {group = "file.txt"}; a preset's relative paths are beside the preset."""
    num_per_prompt: int = 4
    max_prompts: int = 0
    """At most this many prompts per group (0 = all)."""
    seed: int = 20231
    """Prompt j of every evaluation starts from the noise of seed + j."""
    num_steps: int = 0
    """Denoising steps of the evaluation's sampler (0 = sample.num_steps): training may sample
    with fewer steps than it is judged at (Flow-GRPO: 10 in training, 40 at evaluation)."""


@dataclass
class GuardConfig:
    """Stopping rules against over-optimisation; each is off at 0. The run keeps the best LoRA
    by evaluation reward in best_lora/ and says which rule stopped it."""

    patience: int = 0
    """Stop after this many evaluations without a new best evaluation reward."""
    max_kl: float = 0.0
    """Stop when the KL from the base model (metric kl_to_base) exceeds this."""
    min_diversity: float = 0.0
    """Stop when the diversity of the epoch's samples falls below this."""
    kl_samples: int = 4
    """Trajectories on which kl_to_base is measured (0 = never measured)."""
    kl_every: int = 10
    """Measure kl_to_base every this many epochs and after the last (1 = every epoch, 0 = only
    for guard.max_kl). guard.max_kl measures it every epoch. Each measurement costs 2 x
    kl_samples x sample.num_steps guided forward passes; its seconds are logged (kl_seconds)."""


@dataclass
class Config:
    seed: int = 0
    num_epochs: int = 100
    output_dir: str = "runs/ddpo"
    save_every: int = 1
    """Save the LoRA and a resumable checkpoint every this many epochs (and always at the end)."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints to keep in output_dir/checkpoints."""
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    """accelerate trackers: any of 'tensorboard', 'wandb'; [] for none (metrics.jsonl always)."""
    preset: str = ""
    """Name of the preset this config came from (recorded in outputs)."""
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def validate(self) -> Config:
        """Raise ConfigError naming the first field out of range; returns self."""
        s, t, a = self.sample, self.train, self.advantages
        checks = [
            ("num_epochs", self.num_epochs >= 1, "an integer >= 1"),
            ("save_every", self.save_every >= 1, "an integer >= 1"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, "an integer >= 1"),
            (
                "log_with",
                set(self.log_with) <= set(TRACKERS),
                f"a list of {', '.join(map(repr, TRACKERS))}",
            ),
            ("sample.num_steps", s.num_steps >= 1, "an integer >= 1"),
            (
                "sample.eta",
                0 <= s.eta <= 1,
                "a number in [0, 1] (DDPO needs > 0; the paper uses 1.0; above 1 the step's "
                "variance exceeds the DDPM posterior's and it is no longer a DDIM step)",
            ),
            ("sample.guidance_scale", s.guidance_scale >= 0, "a number >= 0"),
            ("sample.batch_size", s.batch_size >= 1, "an integer >= 1"),
            (
                "sample.resolution",
                s.resolution >= 0 and s.resolution % 8 == 0,
                "a multiple of 8 (pixels), or 0 for the model's native size",
            ),
            (
                "model.max_sequence_length",
                self.model.max_sequence_length >= -1,
                "an integer >= 0 (text-encoder tokens), or -1 for the model's default",
            ),
            (
                "model.family",
                self.model.family in ("auto", *FAMILIES),
                f"'auto' or one of {', '.join(map(repr, FAMILIES))}",
            ),
            (
                "sample.group_size",
                s.group_size >= 1 and s.batch_size % s.group_size == 0,
                f"an integer >= 1 dividing sample.batch_size ({s.batch_size})",
            ),
            ("sample.num_batches_per_epoch", s.num_batches_per_epoch >= 1, "an integer >= 1"),
            ("train.algorithm", t.algorithm in ALGORITHMS, f"one of {', '.join(ALGORITHMS)}"),
            ("train.learning_rate", t.learning_rate > 0, "a number > 0"),
            ("train.batch_size", t.batch_size >= 1, "an integer >= 1"),
            ("train.gradient_accumulation", t.gradient_accumulation >= 1, "an integer >= 1"),
            ("train.num_inner_epochs", t.num_inner_epochs >= 1, "an integer >= 1"),
            ("train.timestep_fraction", 0 < t.timestep_fraction <= 1, "a number in (0, 1]"),
            ("train.first_steps", t.first_steps >= 0, "an integer >= 0 (0 = all steps)"),
            ("train.timestep_chunk", t.timestep_chunk >= 0, "an integer >= 0 (0 = all at once)"),
            ("train.micro_batch_size", t.micro_batch_size >= 0, "an integer >= 0 (0 = whole)"),
            ("train.clip_range", t.clip_range > 0, "a number > 0"),
            ("train.adv_clip_max", t.adv_clip_max > 0, "a number > 0"),
            ("train.max_grad_norm", t.max_grad_norm > 0, "a number > 0"),
            ("train.rwr_weighting", t.rwr_weighting in ("exp", "sparse"), "'exp' or 'sparse'"),
            ("train.rwr_temperature", t.rwr_temperature > 0, "a number > 0"),
            ("train.rwr_sparse_quantile", 0 <= t.rwr_sparse_quantile < 1, "a number in [0, 1)"),
            ("train.nft_beta", t.nft_beta > 0, "a number > 0"),
            (
                "train.awm_weighting",
                t.awm_weighting in ("uniform", "ghuber"),
                "'uniform' or 'ghuber'",
            ),
            ("train.awm_power", t.awm_power > 0, "a number > 0"),
            (
                "sample.sampler",
                s.sampler in ("ddim", "dpm-solver"),
                "'ddim' or 'dpm-solver'",
            ),
            (
                "sample.flow_sampler",
                s.flow_sampler in FLOW_SAMPLERS,
                f"one of {', '.join(map(repr, FLOW_SAMPLERS))}",
            ),
            (
                "sample.sde_window_size",
                0 <= s.sde_window_size <= s.num_steps,
                f"an integer in [0, sample.num_steps = {s.num_steps}] (0 = every step)",
            ),
            (
                "sample.sde_window_range",
                1 <= s.sde_window_range <= s.num_steps - s.sde_window_size + 1,
                f"an integer in [1, num_steps - sde_window_size + 1 = "
                f"{s.num_steps - s.sde_window_size + 1}] (the window must end by the last step)",
            ),
            (
                "advantages.group_baseline",
                a.group_baseline in ("auto", "normalised", "leave-one-out"),
                "'auto', 'normalised' or 'leave-one-out'",
            ),
            ("advantages.buffer_size", a.buffer_size >= 1, "an integer >= 1"),
            ("advantages.min_count", a.min_count >= 1, "an integer >= 1"),
            ("lora.rank", self.lora.rank >= 1, "an integer >= 1"),
            ("reward.timeout", self.reward.timeout > 0, "a number > 0 (seconds)"),
            ("reward.local_timeout", self.reward.local_timeout > 0, "a number > 0 (seconds)"),
            ("train.kl_coef", t.kl_coef >= 0, "a number >= 0"),
            ("eval.every", self.eval.every >= 0, "an integer >= 0 (0 = never)"),
            ("eval.num_per_prompt", self.eval.num_per_prompt >= 1, "an integer >= 1"),
            ("eval.max_prompts", self.eval.max_prompts >= 0, "an integer >= 0 (0 = all)"),
            ("guard.patience", self.guard.patience >= 0, "an integer >= 0 (0 = off)"),
            ("guard.max_kl", self.guard.max_kl >= 0, "a number >= 0 (0 = off)"),
            ("guard.min_diversity", self.guard.min_diversity >= 0, "a number >= 0 (0 = off)"),
            ("guard.kl_samples", self.guard.kl_samples >= 0, "an integer >= 0"),
            ("eval.num_steps", self.eval.num_steps >= 0, "an integer >= 0 (0 = sample's)"),
            ("memory.encode_batch_size", self.memory.encode_batch_size >= 1, "an integer >= 1"),
            ("guard.kl_every", self.guard.kl_every >= 0, "an integer >= 0 (0 = only for max_kl)"),
            ("reward.retries", self.reward.retries >= 0, "an integer >= 0"),
            ("reward.backoff", self.reward.backoff >= 0, "a number >= 0 (seconds)"),
            ("lora.alpha", self.lora.alpha > 0, "a number > 0"),
            ("lora.target_modules", len(self.lora.target_modules) > 0, "a non-empty list"),
            (
                "memory.mixed_precision",
                self.memory.mixed_precision in PRECISIONS,
                "'no', 'fp16' or 'bf16'",
            ),
            (
                "memory.attention",
                self.memory.attention in ATTENTIONS,
                "'sdpa', 'xformers' or 'math'",
            ),
            (
                "memory.quantize_base",
                self.memory.quantize_base in QUANTIZATIONS,
                f"one of {', '.join(map(repr, QUANTIZATIONS))}",
            ),
        ]
        for name, ok, accepted in checks:
            if not ok:
                raise ConfigError(
                    f"{name} = {get_field(self, name)!r} is invalid: expected {accepted}"
                )
        if s.sampler == "dpm-solver" and t.algorithm not in TRAJECTORY_FREE:
            raise ConfigError(
                f"sample.sampler = 'dpm-solver' is deterministic (no log-probability); "
                f"{t.algorithm} needs the DDIM policy: use train.algorithm = 'nft' or 'awm', or "
                "sample.sampler = 'ddim'"
            )
        if t.algorithm == "grpo" and s.group_size < 2:
            raise ConfigError(
                "train.algorithm = 'grpo' normalises each reward within its group: set "
                "sample.group_size >= 2 (Flow-GRPO uses 16 to 24), or use ddpo-is"
            )
        if s.sde_window_size and t.algorithm in ("rwr", *TRAJECTORY_FREE):
            raise ConfigError(
                f"sample.sde_window_size trains only a window of the stored steps; {t.algorithm} "
                "trains on the final samples and keeps no steps: set it to 0"
            )
        if t.algorithm in ("ddpo-is", "ddpo-sf", "grpo") and s.eta <= 0:
            raise ConfigError(
                f"sample.eta = {s.eta} gives a deterministic sampler with no log-probability; "
                f"{t.algorithm} needs eta > 0 (the paper uses 1.0), or use train.algorithm = 'rwr'"
            )
        if t.algorithm in ONE_STEP_ALGORITHMS and t.num_inner_epochs != 1:
            raise ConfigError(
                f"train.num_inner_epochs = {t.num_inner_epochs}: {t.algorithm} is on-policy "
                "only and takes one optimizer step per epoch; set it to 1 or use ddpo-is"
            )
        deterministic = s.eta == 0 or s.sampler == "dpm-solver"
        if deterministic and s.group_size > 1 and s.same_initial_noise:
            raise ConfigError(
                f"a deterministic sampler (sample.eta = {s.eta}, sample.sampler = {s.sampler!r}) "
                f"with sample.group_size = {s.group_size}: a group's images share their prompt "
                "and starting noise, so they are identical and every advantage 0; set "
                "sample.same_initial_noise = false, sample.eta > 0 or sample.group_size = 1"
            )
        if t.algorithm in TRAJECTORY_FREE and self.guard.max_kl:
            raise ConfigError(
                f"guard.max_kl measures the KL along stored trajectories, and {t.algorithm} "
                "stores none: set guard.max_kl = 0 (or use ddpo-is)"
            )
        url = self.reward.url
        if url and not (url.startswith(("http://", "https://")) and url.split("://", 1)[1]):
            raise ConfigError(
                f"reward.url = {url!r} is invalid: give the reward server's address as "
                "http://HOST:PORT (see `ddpo-lite serve-reward`), or '' to score in-process"
            )
        if "wandb" in self.log_with and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "log_with includes 'wandb' but wandb is not installed: "
                "pip install 'ddpo-lite[wandb]' (then `wandb login`), or set "
                'log_with = ["tensorboard"]'
            )
        if self.eval.every and not self.eval.prompts:
            raise ConfigError("eval.every is set but eval.prompts names no prompt file")
        if self.guard.patience and not self.eval.every:
            raise ConfigError("guard.patience counts evaluations: set eval.every too")
        if self.guard.max_kl and not self.guard.kl_samples:
            raise ConfigError("guard.max_kl needs guard.kl_samples > 0 to measure the KL")
        if t.kl_coef and t.algorithm == "rwr":
            raise ConfigError("train.kl_coef applies to ddpo-is and ddpo-sf, not rwr")
        if self.memory.quantize_base in ("nf4", "int8") and self.memory.cpu:
            raise ConfigError(
                f"memory.quantize_base = {self.memory.quantize_base!r} runs through diffusers' "
                "bitsandbytes quantizer, which needs a GPU, and memory.cpu = true: use "
                "memory.quantize_base = 'fp8' (layerwise fp8 storage runs on the CPU) or 'none'"
            )
        m = self.model
        if m.family in ("sd1", "sdxl") and m.max_sequence_length != -1:
            raise ConfigError(
                f"model.max_sequence_length = {m.max_sequence_length} but model.family = "
                f"{m.family!r} reads its prompts as CLIP's 77 tokens, fixed; it sets the T5 / "
                "Qwen3 tokens of the flow families (sd3, flux, flux2): set it to -1"
            )
        if not self.prompts.file and not self.prompts.prompts:
            raise ConfigError("prompts.prompts is empty and prompts.file is unset: give one")
        return self


ALGORITHMS = ("ddpo-is", "ddpo-sf", "rwr", "grpo", "nft", "awm")
#: Algorithms that need no log-probability: the rollout keeps only the final latents.
TRAJECTORY_FREE = ("nft", "awm")
#: On-policy algorithms: one optimizer step per epoch (the old policy is the current one).
ONE_STEP_ALGORITHMS = ("ddpo-sf", "nft", "awm")
FAMILIES = ("sd1", "sdxl", "sd3", "flux", "flux2")  # ddpo_lite.families.FAMILY_NAMES
FLOW_SAMPLERS = ("sde", "cps")
TRACKERS = ("tensorboard", "wandb")
PRECISIONS = ("no", "fp16", "bf16")
ATTENTIONS = ("sdpa", "xformers", "math")
QUANTIZATIONS = ("none", "nf4", "int8", "fp8")


def get_field(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check/convert `value` to the field's type; ConfigError naming `name` if it does not fit."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin is dict:
        _, value_type = typing.get_args(annotation)
        if isinstance(value, dict):
            return {str(k): _coerce(f"{name}.{k}", v, value_type) for k, v in value.items()}
    elif origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, list):
            return [_coerce(f"{name}[{i}]", v, item_type) for i, v in enumerate(value)]
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(name, value, option)
            except ConfigError:
                continue
    else:
        raise TypeError(f"unsupported config annotation {annotation!r} for {name}")
    type_name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{name} = {value!r} has the wrong type: expected {type_name}")


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {name!r}; {_suggest(key, fields, prefix)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            if not isinstance(value, dict):
                raise ConfigError(f"{name} is a section; give it as a table, e.g. [{name}]")
            _apply(current, value, prefix=f"{name}.")
        else:
            setattr(obj, key, _coerce(name, value, hints[key]))


def _suggest(key: str, fields: set[str], prefix: str) -> str:
    """'did you mean X?' for the nearest known key, else the list of known keys."""
    nearest = difflib.get_close_matches(key, sorted(fields), n=1, cutoff=0.6)
    if nearest:
        return f"did you mean {prefix + nearest[0]!r}?"
    known = ", ".join(sorted(f"{prefix}{f}" for f in fields))
    return f"known keys here: {known}"


def parse_override(text: str) -> dict[str, Any]:
    """'train.learning_rate=1e-4' -> {'train': {'learning_rate': 1e-4}} (values parsed as TOML,
    falling back to a bare string)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def preset_path(name_or_path: str) -> Path:
    """The TOML file for a preset name (in presets/) or a path to a user's .toml file."""
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise ConfigError(f"preset file {name_or_path!r} does not exist")
        return path
    candidate = PRESETS_DIR / f"{name_or_path}.toml"
    if not candidate.is_file():
        names = ", ".join(list_presets())
        raise ConfigError(f"unknown preset {name_or_path!r}; available: {names} (or a .toml path)")
    return candidate


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated Config: defaults, then the preset's TOML, then `key=value` overrides."""
    config = Config()
    if preset:
        path = preset_path(preset)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"preset {str(path)!r} is not valid TOML: {err}") from None
        _apply(config, data)
        _resolve_relative_prompt_file(config, path.parent)
        if not config.preset:
            config.preset = path.stem
    for text in overrides:
        _apply(config, parse_override(text))
    return config.validate()


def _resolve_relative_prompt_file(config: Config, preset_dir: Path) -> None:
    """A preset's relative prompt files name files beside the preset (presets/prompts/...)."""

    def resolve(file: str) -> str:
        if file and not Path(file).is_absolute() and (preset_dir / file).is_file():
            return str((preset_dir / file).resolve())
        return file

    config.prompts.file = resolve(config.prompts.file)
    config.eval.prompts = {name: resolve(file) for name, file in config.eval.prompts.items()}


def config_from_dict(data: dict[str, Any]) -> Config:
    """A validated Config from a nested dict (as written by `to_dict`)."""
    config = Config()
    _apply(config, data)
    return config.validate()


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_toml(config: Config) -> str:
    """The fully resolved config as TOML text (scalars first, then one table per section)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in to_dict(config).items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    raise TypeError(f"cannot write {value!r} as TOML")
