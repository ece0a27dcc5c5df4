"""Rollouts that record trajectories, and the prompt encoder that caches their conditioning.

`rollout` runs the whole denoising chain with classifier-free guidance on a diffusers pipeline's
own parts, through the policy's family (the guided model call, latents, decoding) and sampler
(the DDIM step with its log-probability), and returns the decoded images plus the `Trajectory`
the update needs. Sampling and training call the same `Policy.predict` and sampler step, so the
two sides of the PPO ratio are computed by one function under one configuration.

The DDIM math lives in samplers/ddim.py and SD 1.x's guided UNet call in families/sd1.py; both
are importable from here as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ddpo_lite.families import Cond, latent_shape
from ddpo_lite.families.sd1 import predict_noise
from ddpo_lite.policy import Policy
from ddpo_lite.samplers.ddim import ddim_kl, ddim_mean_std, ddim_step_with_logprob

__all__ = [
    "PromptEncoder",
    "Trajectory",
    "ddim_kl",
    "ddim_mean_std",
    "ddim_step_with_logprob",
    "decode_latents",
    "predict_noise",
    "rollout",
]


@dataclass
class Trajectory:
    """What a rollout records for the update; every tensor is detached.

    chain:          (B, N+1, C, H, W) float32, x_T, x_{T-1}, ..., x_0: the states of the N
                    recorded steps (an SDE window records only its steps)
    latents:        view chain[:, :-1], x_t before each step
    next_latents:   view chain[:, 1:], x_{t-1} after each step (the actions)
    timesteps:      (B, N) long, each step's timestep (DDIM) or step index (flow samplers)
    log_probs:      (B, N) float32, log pi_old(x_{t-1} | x_t), mean-reduced over elements
    cond:           the family's conditioning, batch-first (SD 1.x: prompt_embeds (B, L, D))
    negative:       the unconditional conditioning (batch 1), or None without guidance
    prompt_ids:     (B,) long, index of each sample's prompt in the prompt list
    final:          (B, C, H, W) the final latent x_0 where the chain does not end with it (an
                    SDE window, CPS's deterministic last step), else None

    Storing the chain once, not x_t and x_{t-1} separately, halves the epoch's largest tensor.
    The chain may be held on the CPU (memory.offload_trajectory) while the rest stays on the
    accelerator (`device`); `index` keeps it where it is, `on_device` brings it over.
    """

    chain: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    cond: Cond
    negative: Cond | None
    prompt_ids: torch.Tensor
    final: torch.Tensor | None = None

    @property
    def final_latents(self) -> torch.Tensor:
        """x_0 of each sample, (B, C, H, W)."""
        return self.final if self.final is not None else self.chain[:, -1]

    @property
    def latents(self) -> torch.Tensor:
        return self.chain[:, :-1]

    @property
    def next_latents(self) -> torch.Tensor:
        return self.chain[:, 1:]

    @property
    def prompt_embeds(self) -> torch.Tensor:
        """The text embeddings every family has, (B, L, D)."""
        return self.cond["prompt_embeds"]

    def __len__(self) -> int:
        return self.chain.shape[0]

    @property
    def device(self) -> torch.device:
        """Where the trajectory is used (its log-probs live there; the chain may be offloaded)."""
        return self.log_probs.device

    def on_device(self) -> Trajectory:
        """The same samples with the chain on `device` (itself where it is there already)."""
        if self.chain.device == self.device:
            return self
        return dataclasses.replace(self, chain=self.chain.to(self.device, non_blocking=True))

    def index(self, rows: torch.Tensor) -> Trajectory:
        """The samples at `rows` (a 1-D index tensor); the chain stays where it is held."""
        chain_rows, rows = rows.to(self.chain.device), rows.to(self.device)
        return Trajectory(
            chain=self.chain[chain_rows],
            timesteps=self.timesteps[rows],
            log_probs=self.log_probs[rows],
            cond=self.cond.index(rows),
            negative=self.negative,
            prompt_ids=self.prompt_ids[rows],
            final=self.final[rows] if self.final is not None else None,
        )

    @staticmethod
    def cat(parts: Sequence[Trajectory], chain: torch.Tensor | None = None) -> Trajectory:
        """Concatenate trajectories along the sample axis; `chain`, when given, already holds
        the parts' chains (filled as they came, so that no second copy is ever made)."""
        return Trajectory(
            chain=chain if chain is not None else torch.cat([p.chain for p in parts]),
            timesteps=torch.cat([p.timesteps for p in parts]),
            log_probs=torch.cat([p.log_probs for p in parts]),
            cond=Cond.cat([p.cond for p in parts]),
            negative=parts[0].negative,
            prompt_ids=torch.cat([p.prompt_ids for p in parts]),
            final=torch.cat([p.final for p in parts]) if parts[0].final is not None else None,
        )

    def is_finite(self) -> torch.Tensor:
        """(B,) bool: the sample's latents, log-probs and conditioning are all finite."""
        return (
            torch.isfinite(self.chain).flatten(1).all(1).to(self.device)
            & torch.isfinite(self.log_probs).all(1)
            & self.cond.all_finite()
        )

    def masked(self, valid: torch.Tensor) -> Trajectory:
        """Zeros in place of the samples where `valid` is False (they stay finite)."""
        keep = valid.view(-1, *([1] * (self.chain.ndim - 1)))
        return Trajectory(
            chain=torch.where(keep.to(self.chain.device), self.chain, 0.0),
            timesteps=self.timesteps,
            log_probs=torch.where(valid[:, None], self.log_probs, 0.0),
            cond=self.cond,
            negative=self.negative,
            prompt_ids=self.prompt_ids,
            final=torch.where(keep[:, 0], self.final, 0.0) if self.final is not None else None,
        )


class PromptEncoder:
    """Encodes each distinct prompt once with the family's (the pipeline's own) `encode_prompt`,
    then caches its conditioning.

    With `offload=True` the text encoders live on the CPU and visit `device` only while they
    encode prompts not seen before. With `on_cpu=True` they never leave the CPU: they encode
    there and only the embeddings move to `device` (SD3's T5-XXL, 9 GB in bf16, never meets the
    accelerator; setup is slower). `max_sequence_length`: the flow families' text-encoder
    tokens (`model.max_sequence_length`; -1: the model's default), kept resolved.
    """

    def __init__(
        self,
        pipe,
        device: torch.device,
        negative_prompt: str = "",
        offload: bool = False,
        family=None,
        resolution: int = 0,
        on_cpu: bool = False,
        max_sequence_length: int = -1,
    ):
        from ddpo_lite.families import family_of, sequence_length

        self.on_cpu = on_cpu
        self.pipe = pipe
        self.family = family or family_of(pipe)
        self.device = torch.device(device)
        self.negative_prompt = negative_prompt
        self.offload = offload
        self.resolution = resolution or self.family.native_resolution(pipe)
        self.max_sequence_length = sequence_length(pipe, max_sequence_length)  # -1: CLIP only
        self._cache: dict[str, dict[str, torch.Tensor]] = {}
        self._negative: Cond | None = None
        self._place("cpu" if offload or on_cpu else self.device)

    def _place(self, device) -> None:
        for encoder in self.family.text_encoders(self.pipe):
            encoder.to(device)

    def preload(self, prompts: Sequence[str], batch_size: int = 64) -> None:
        """Encode `prompts` now, in fixed sorted batches: a prompt's embedding then does not depend
        on which prompts an epoch happened to draw with it (a resumed run matches a straight one)."""
        distinct = sorted(set(prompts))
        for start in range(0, len(distinct), batch_size):
            self(distinct[start : start + batch_size])

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> tuple[Cond, Cond]:
        """(the prompts' conditioning (B, ...), the negative prompt's (1, ...))."""
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing or self._negative is None:
            visit = self.offload and not self.on_cpu
            if visit:
                self._place(self.device)
            where = torch.device("cpu") if self.on_cpu else self.device
            cond, negative = self.family.encode(
                self.pipe,
                missing or [""],
                where,
                self.negative_prompt,
                self.resolution,
                self.max_sequence_length,
            )
            if visit:
                self._place("cpu")
            if self.on_cpu:
                cond, negative = cond.to(self.device), negative.to(self.device)
            for prompt, row in zip(missing, cond.rows(), strict=False):
                self._cache[prompt] = row
            self._negative = negative
        return Cond.stack([self._cache[p] for p in prompts]), self._negative


@torch.no_grad()
def rollout(
    policy: Policy,
    prompts: Sequence[str],
    prompt_ids: torch.Tensor,
    generator: torch.Generator,
    group_size: int = 1,
    record: bool = True,
    window: range | None = None,
    shared_noise: bool = True,
) -> tuple[list[Image.Image], Trajectory]:
    """Sample one batch of images for `prompts` from `policy` and record its trajectory.

    The sampler's scheduler has its timesteps set (the same one the update scores with); the VAE
    and image processor are the pipeline's. Latents stay in float32 from start to end; what is
    stored is exactly what was scored. With `group_size` > 1, consecutive groups of that many
    images share one initial latent (unless `shared_noise` is False; their prompts are the
    caller's to repeat).

    `window` (a range of step indices; None = all) is the SDE window of Flow-GRPO-Fast and
    MixGRPO: only its steps are stochastic and recorded, the others take the deterministic
    (ODE / eta 0) step and keep nothing. `record=False` (the log-prob-free algorithms) keeps no
    chain: the trajectory's `chain` is the final latent alone, (B, 1, C, H, W), and `log_probs`
    is empty, (B, 0); the sampler may then be deterministic (eta = 0).
    """
    encoder, sampler = policy.encoder, policy.sampler
    device = encoder.device
    batch = len(prompts)
    cond, negative = encoder(prompts)
    if not policy.guided:
        negative = None

    if batch % group_size:
        raise ValueError(f"group_size {group_size} does not divide the batch of {batch}")
    noises = batch // group_size if shared_noise else batch
    shape = latent_shape(policy.pipe, noises, encoder.resolution)
    latents = torch.randn(shape, generator=generator, device=generator.device).to(device)
    if shared_noise:
        latents = latents.repeat_interleave(group_size, dim=0)
    latents = latents * sampler.init_noise_sigma

    sampler.begin()
    steps = sampler.timesteps
    # which steps take noise, and which are kept, is known on the host: the loop never syncs
    in_window = window if window is not None else range(len(steps))
    noisy = set(sampler.stochastic_steps()) & set(in_window)
    recorded = noisy if record else set()
    states, all_log_probs, recorded_steps = [], [], []
    for i, t in enumerate(steps):
        model_output = policy.predict(latents, t, cond, negative)
        if i in recorded:
            next_latents, log_prob = sampler.step(model_output, t, latents, generator=generator)
            states += [next_latents] if states else [latents, next_latents]
            all_log_probs.append(log_prob)
            recorded_steps.append(t)
        else:
            stochastic = i in noisy
            next_latents = sampler.advance(model_output, t, latents, generator, stochastic)
        latents = next_latents

    images = policy.decode(latents)
    ends_at_x0 = window is None and max(recorded, default=-1) == len(steps) - 1
    if not recorded_steps:  # nothing stochastic kept: the final latent and the whole grid
        states, recorded_steps, ends_at_x0 = [latents], list(steps), True
    # a window always keeps x0 apart: an epoch's batches (each its own window) then concatenate
    trajectory = Trajectory(
        chain=torch.stack(states, dim=1),
        timesteps=torch.stack(list(recorded_steps)).to(device).repeat(batch, 1),
        log_probs=(
            torch.stack(all_log_probs, dim=1) if all_log_probs else latents.new_zeros(batch, 0)
        ),
        cond=cond,
        negative=negative,
        prompt_ids=prompt_ids.to(device),
        final=None if ends_at_x0 else latents,
    )
    return images, trajectory


def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """Decode final latents with the pipeline's VAE and image processor into PIL images."""
    from ddpo_lite.families import family_of

    return family_of(pipe).decode(pipe, latents)
