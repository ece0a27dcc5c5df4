"""Sampling: the DDIM step as a Gaussian policy, and rollouts that record trajectories.

DDPO treats each DDIM step with eta > 0 as an action drawn from a Gaussian policy
pi(x_{t-1} | x_t, c). `ddim_step_with_logprob` takes that step and returns the log-density of the
sample it took (or of one it is given), so the trainer can recompute the same quantity under the
current LoRA. `rollout` runs the whole denoising chain with classifier-free guidance on a diffusers
pipeline's own parts and returns the decoded images plus the `Trajectory` the update needs.

Both sampling and training call `predict_noise` for the guided UNet output, so the two sides of the
PPO ratio are computed by one function under one configuration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from PIL import Image

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _gather(values: torch.Tensor, index: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[index] reshaped to broadcast over a (batch, ...) tensor with `ndim` dims."""
    out = values.to(index.device)[index]
    return out.reshape(-1, *([1] * (ndim - 1)))


def ddim_mean_std(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (like `sample`) and std (broadcastable, (B, 1, ...)) of the DDIM policy
    p(x_{t-1} | x_t), in float32; `ddim_step_with_logprob` documents the formulas."""
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.set_timesteps(num_steps) must be called before stepping")
    if scheduler.config.thresholding:
        raise ValueError("DDIM thresholding is not supported: set scheduler thresholding=False")
    if eta <= 0:
        raise ValueError(
            f"eta must be > 0 for a stochastic policy with a log-probability, got {eta}"
        )

    model_output = model_output.float()
    sample = sample.float()
    ndim = sample.ndim
    batch = sample.shape[0]
    device = sample.device

    # 1. alphas for t and for the previous timestep t - T/N (per batch element)
    t = torch.as_tensor(timestep, device=device).long().reshape(-1).expand(batch)
    step_size = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_t = t - step_size
    alphas_cumprod = scheduler.alphas_cumprod.float()
    alpha_prod_t = _gather(alphas_cumprod, t, ndim)
    final = torch.as_tensor(float(scheduler.final_alpha_cumprod))
    alpha_prod_prev = torch.where(
        prev_t >= 0, alphas_cumprod.to(device)[prev_t.clamp(min=0)], final.to(device)
    ).reshape(-1, *([1] * (ndim - 1)))
    beta_prod_t = 1 - alpha_prod_t

    # 2. x0_hat and eps from the model output
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_x0 = (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()
        pred_eps = model_output
    elif prediction_type == "v_prediction":
        pred_x0 = alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output
        pred_eps = alpha_prod_t.sqrt() * model_output + beta_prod_t.sqrt() * sample
    elif prediction_type == "sample":
        pred_x0 = model_output
        pred_eps = (sample - alpha_prod_t.sqrt() * pred_x0) / beta_prod_t.sqrt()
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")

    # 3. clipping of x0_hat, as DDIMScheduler does it (eps is not recomputed: use_clipped_model_output=False)
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        pred_x0 = pred_x0.clamp(-limit, limit)

    # 4. mean and std of the Gaussian (DDIM eq. 12 and 16)
    variance = (1 - alpha_prod_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_prev)
    std_dev = eta * variance.sqrt()
    direction = (1 - alpha_prod_prev - std_dev**2).clamp(min=0).sqrt() * pred_eps
    mean = alpha_prod_prev.sqrt() * pred_x0 + direction
    return mean, std_dev


def ddim_kl(
    scheduler: DDIMScheduler,
    policy_output: torch.Tensor,
    base_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float,
) -> torch.Tensor:
    """KL(policy || base) of one DDIM step from the same x_t, shape (batch,).

    Both are Gaussians with the same std (it depends on t and eta only), so the KL is
    |mean_policy - mean_base|^2 / (2 std^2), averaged over the latent's elements like the log-prob.
    """
    mean_policy, std = ddim_mean_std(scheduler, policy_output, timestep, sample, eta)
    mean_base, _ = ddim_mean_std(scheduler, base_output, timestep, sample, eta)
    kl = (mean_policy - mean_base) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, sample.ndim)))


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} as a Gaussian policy; returns (prev_sample, log_prob).

    Notation (DDIM paper, Song et al. 2021, eq. 12; diffusers `DDIMScheduler.step`):
        a_t     = alphas_cumprod[t],  a_prev = alphas_cumprod[t - T/N] (or final_alpha_cumprod)
        x0_hat  = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)             (epsilon prediction)
        sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        mean    = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma_t^2) * eps
        x_{t-1} ~ N(mean, sigma_t^2 I)

    Steps:
        1. look up a_t, a_prev per batch element (`timestep` may be a scalar or shape (batch,)),
        2. predict x0_hat and eps from the model output (epsilon, v_prediction or sample),
        3. clip x0_hat as the scheduler is configured to (thresholding is not supported),
        4. compute mean and sigma_t; draw x_{t-1} unless `prev_sample` is given,
        5. log N(x_{t-1}; mean, sigma_t^2), averaged over the latent's elements.

    Reduction: the log-density is the MEAN over the non-batch elements (C*H*W), as in the DDPO
    authors' code, not the sum; log_prob has shape (batch,). The PPO clip range is interpreted
    against this per-element average. Everything is computed in float32 whatever the input dtype.

    Held against `diffusers.DDIMScheduler.step(..., eta=eta, variance_noise=z)` in
    tests/test_sampling.py: same mean and std, and the same density as a float64 reference.
    """
    mean, std_dev = ddim_mean_std(scheduler, model_output, timestep, sample, eta)
    device = sample.device
    ndim = sample.ndim
    if prev_sample is None:
        noise = torch.randn(
            sample.shape, generator=generator, device=generator.device if generator else device
        ).to(device)
        prev_sample = mean + std_dev * noise

    # 5. Gaussian log-density, averaged over the latent's elements -> (batch,)
    log_prob = (
        -((prev_sample.detach().float() - mean) ** 2) / (2 * std_dev**2)
        - torch.log(std_dev)
        - _LOG_SQRT_2PI
    )
    log_prob = log_prob.mean(dim=tuple(range(1, ndim)))
    return prev_sample, log_prob


def predict_noise(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """The UNet's noise prediction with classifier-free guidance, in float32.

    latents: (B, C, H, W); timesteps: (B,) or scalar; prompt_embeds: (B, L, D);
    negative_embeds: (B, L, D) or (1, L, D), or None when guidance is off (guidance_scale <= 1).
    The unconditional and conditional halves run as one UNet batch of 2B, as the pipeline does.
    """
    batch = latents.shape[0]
    timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(batch)
    if negative_embeds is None:
        return unet(latents, timesteps, encoder_hidden_states=prompt_embeds).sample.float()
    negative_embeds = negative_embeds.expand(batch, -1, -1)
    noise_pred = unet(
        torch.cat([latents, latents]),
        torch.cat([timesteps, timesteps]),
        encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds]),
    ).sample.float()
    uncond, cond = noise_pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@dataclass
class Trajectory:
    """What a rollout records for the update; every tensor is detached.

    chain:          (B, N+1, C, H, W) float32, x_T, x_{T-1}, ..., x_0: the states of the N steps
    latents:        view chain[:, :-1], x_t before each step
    next_latents:   view chain[:, 1:], x_{t-1} after each step (the actions)
    timesteps:      (B, N) long, the timestep of each step
    log_probs:      (B, N) float32, log pi_old(x_{t-1} | x_t), mean-reduced over elements
    prompt_embeds:  (B, L, D) conditional text embeddings
    negative_embeds:(1, L, D) unconditional embeddings, or None without guidance
    prompt_ids:     (B,) long, index of each sample's prompt in the prompt list

    Storing the chain once, not x_t and x_{t-1} separately, halves the epoch's largest tensor.
    """

    chain: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    prompt_ids: torch.Tensor

    @property
    def latents(self) -> torch.Tensor:
        return self.chain[:, :-1]

    @property
    def next_latents(self) -> torch.Tensor:
        return self.chain[:, 1:]

    def __len__(self) -> int:
        return self.chain.shape[0]

    def index(self, rows: torch.Tensor) -> Trajectory:
        """The samples at `rows` (a 1-D index tensor)."""
        return Trajectory(
            chain=self.chain[rows],
            timesteps=self.timesteps[rows],
            log_probs=self.log_probs[rows],
            prompt_embeds=self.prompt_embeds[rows],
            negative_embeds=self.negative_embeds,
            prompt_ids=self.prompt_ids[rows],
        )

    @staticmethod
    def cat(parts: Sequence[Trajectory], chain: torch.Tensor | None = None) -> Trajectory:
        """Concatenate trajectories along the sample axis; `chain`, when given, already holds
        the parts' chains (filled as they came, so that no second copy is ever made)."""
        first = parts[0]
        return Trajectory(
            chain=chain if chain is not None else torch.cat([p.chain for p in parts]),
            timesteps=torch.cat([p.timesteps for p in parts]),
            log_probs=torch.cat([p.log_probs for p in parts]),
            prompt_embeds=torch.cat([p.prompt_embeds for p in parts]),
            negative_embeds=first.negative_embeds,
            prompt_ids=torch.cat([p.prompt_ids for p in parts]),
        )


class PromptEncoder:
    """Encodes each distinct prompt once with the pipeline's own `encode_prompt`, then caches it.

    With `offload=True` the text encoder lives on the CPU and visits `device` only while it
    encodes prompts not seen before.
    """

    def __init__(
        self, pipe, device: torch.device, negative_prompt: str = "", offload: bool = False
    ):
        self.pipe = pipe
        self.device = torch.device(device)
        self.negative_prompt = negative_prompt
        self.offload = offload
        self._cache: dict[str, torch.Tensor] = {}
        self._negative: torch.Tensor | None = None
        pipe.text_encoder.to("cpu" if offload else self.device)

    def preload(self, prompts: Sequence[str], batch_size: int = 64) -> None:
        """Encode `prompts` now, in fixed sorted batches: a prompt's embedding then does not depend
        on which prompts an epoch happened to draw with it (a resumed run matches a straight one)."""
        distinct = sorted(set(prompts))
        for start in range(0, len(distinct), batch_size):
            self(distinct[start : start + batch_size])

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (B, L, D), negative_embeds (1, L, D)) for `prompts`."""
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing or self._negative is None:
            if self.offload:
                self.pipe.text_encoder.to(self.device)
            embeds, negative = self.pipe.encode_prompt(
                missing or [""],
                self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=[self.negative_prompt] * max(len(missing), 1),
            )
            if self.offload:
                self.pipe.text_encoder.to("cpu")
            for prompt, embed in zip(missing, embeds, strict=False):
                self._cache[prompt] = embed
            self._negative = negative[:1]
        return torch.stack([self._cache[p] for p in prompts]), self._negative


@torch.no_grad()
def rollout(
    pipe,
    unet: torch.nn.Module,
    encoder: PromptEncoder,
    prompts: Sequence[str],
    prompt_ids: torch.Tensor,
    *,
    scheduler: DDIMScheduler,
    guidance_scale: float,
    eta: float,
    generator: torch.Generator,
    autocast=None,
    group_size: int = 1,
) -> tuple[list[Image.Image], Trajectory]:
    """Sample one batch of images for `prompts` and record its trajectory.

    `scheduler` is a DDIMScheduler with its timesteps set (the same one the update scores with);
    the VAE and image processor are the pipeline's; `unet` is the policy (the LoRA'd UNet). `autocast` is a context-manager factory, the same one
    the update runs under. Latents stay in float32 from start to end; what is stored is exactly
    what was scored. With `group_size` > 1, consecutive groups of that many images share one
    initial latent (their prompts are the caller's to repeat).
    """
    device = encoder.device
    batch = len(prompts)
    prompt_embeds, negative_embeds = encoder(prompts)
    if guidance_scale <= 1.0:
        negative_embeds = None

    size = pipe.unet.config.sample_size  # latent side; the image side is size * vae_scale_factor
    if batch % group_size:
        raise ValueError(f"group_size {group_size} does not divide the batch of {batch}")
    shape = (batch // group_size, pipe.unet.config.in_channels, size, size)
    latents = torch.randn(shape, generator=generator, device=generator.device).to(device)
    latents = latents.repeat_interleave(group_size, dim=0)
    latents = latents * scheduler.init_noise_sigma

    states, all_log_probs = [latents], []
    for t in scheduler.timesteps:
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            noise_pred = predict_noise(
                unet, latents, t, prompt_embeds, negative_embeds, guidance_scale
            )
        next_latents, log_prob = ddim_step_with_logprob(
            scheduler, noise_pred, t, latents, eta=eta, generator=generator
        )
        states.append(next_latents)
        all_log_probs.append(log_prob)
        latents = next_latents

    images = decode_latents(pipe, latents)
    trajectory = Trajectory(
        chain=torch.stack(states, dim=1),
        timesteps=scheduler.timesteps.to(device).repeat(batch, 1),
        log_probs=torch.stack(all_log_probs, dim=1),
        prompt_embeds=prompt_embeds,
        negative_embeds=negative_embeds,
        prompt_ids=prompt_ids.to(device),
    )
    return images, trajectory


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """Decode final latents with the pipeline's VAE and image processor into PIL images."""
    vae = pipe.vae
    scaled = (latents / vae.config.scaling_factor).to(vae.dtype)
    image = vae.decode(scaled, return_dict=False)[0]
    return pipe.image_processor.postprocess(image.float(), output_type="pil")
