"""Train the `shapes` model from scratch: the small Stable Diffusion that ships with ddpo-lite.

What it does, top to bottom (all seeded by --seed, deterministic for a given thread count):

1. draws a dataset of procedural images with their captions (`ddpo_lite.shapes.world`);
2. trains the AutoencoderKL to reconstruct them (MSE + a small KL term) and sets its
   `scaling_factor` so that scaled latents have unit standard deviation;
3. encodes the dataset once (the posterior mean) and trains the UNet and the CLIP text encoder
   together on the epsilon-prediction loss, with classifier-free-guidance dropout (an empty
   caption for 10% of the samples) and an EMA of both, checking prompt accuracy from pixels on a
   few seeded samples every --eval-every steps;
4. writes the EMA weights as a diffusers `StableDiffusionPipeline` folder (safetensors) plus
   `training_log.json` (settings, losses, accuracies, wall times).

Run (the shipped weights; see ddpo_lite/models/shapes_model/README.md for the measured time):

    OMP_NUM_THREADS=1 python scripts/train_shapes_model.py --seed 0 --out ddpo_lite/models/shapes_model
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from ddpo_lite.models.tiny import quiet_progress_bars
from ddpo_lite.shapes.evaluate import prompt_accuracy
from ddpo_lite.shapes.model import (
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    write_slow_tokenizer_files,
)
from ddpo_lite.shapes.world import random_spec, render


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("ddpo_lite/models/shapes_model"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--dataset-size", type=int, default=24000)
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--unet-steps", type=int, default=2600)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--eval-every", type=int, default=650, help="0 disables the periodic check")
    p.add_argument("--eval-samples", type=int, default=64)
    return p.parse_args()


def lr_at(step: int, total: int, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def make_dataset(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """(images (n, 3, 32, 32) in [-1, 1], captions) drawn by the procedural renderer."""
    rng = np.random.default_rng(seed)
    specs = [random_spec(rng) for _ in range(n)]
    pixels = np.stack([np.asarray(render(s)) for s in specs])  # (n, 32, 32, 3) uint8
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, [s.caption for s in specs]


def train_vae(vae, images: torch.Tensor, args, gen: torch.Generator, log: dict) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.vae_steps, 50))
    held_out = images[-256:]
    train_images = images[:-256]
    vae.train()
    start = time.perf_counter()
    for step in range(args.vae_steps):
        idx = torch.randint(len(train_images), (args.batch_size,), generator=gen)
        x = train_images[idx]  # (B, 3, 32, 32)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            print(f"vae step {step} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    vae.eval()
    with torch.no_grad():
        recon = vae.decode(vae.encode(held_out).latent_dist.mean).sample.clamp(-1, 1)
        mse = F.mse_loss((recon + 1) / 2, (held_out + 1) / 2).item()
    log["vae"] = {"psnr_db": 10 * math.log10(1 / mse), "seconds": time.perf_counter() - start}
    print(f"vae held-out PSNR {log['vae']['psnr_db']:.1f} dB")


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor) -> torch.Tensor:
    """Posterior means of every image, (n, 4, 16, 16), unscaled."""
    return torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(512)])


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


def make_pipeline(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_unet(vae, text_encoder, tokenizer, unet, latents, captions, args, gen, log):
    """Train UNet + text encoder on epsilon prediction; returns their EMA copies."""
    scheduler = build_scheduler()
    alphas = scheduler.alphas_cumprod  # (1000,)
    ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", return_tensors="pt").input_ids  # (1, L)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.unet_steps))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    unet.train()
    text_encoder.train()
    log["unet"] = {"loss": [], "eval": []}
    start = time.perf_counter()
    running = 0.0
    for step in range(args.unet_steps):
        idx = torch.randint(len(latents), (args.batch_size,), generator=gen)
        x0 = latents[idx]  # (B, 4, 16, 16), scaled
        tokens = ids[idx].clone()  # (B, L)
        drop = torch.rand(args.batch_size, generator=gen) < args.cfg_dropout
        tokens[drop] = empty
        t = torch.randint(0, len(alphas), (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context = text_encoder(tokens)[0]  # (B, L, 64)
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=context).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        running += loss.item()
        if (step + 1) % 100 == 0:
            elapsed = time.perf_counter() - start
            log["unet"]["loss"].append([step + 1, running / 100])
            print(f"unet step {step + 1} loss {running / 100:.4f} ({elapsed:.0f} s)", flush=True)
            running = 0.0
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.unet_steps):
            pipe = make_pipeline(vae, ema_text, tokenizer, ema_unet)
            acc = prompt_accuracy(pipe, args.eval_samples, seed=1234)
            log["unet"]["eval"].append({"step": step + 1, **acc})
            print(f"eval at step {step + 1}: {json.dumps(acc)}", flush=True)
    log["unet"]["seconds"] = time.perf_counter() - start
    return ema_unet, ema_text


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    log: dict = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }

    images, captions = make_dataset(args.dataset_size, args.seed)
    tokenizer = build_tokenizer()
    torch.manual_seed(args.seed)
    vae, text_encoder, unet = build_vae(), build_text_encoder(tokenizer), build_unet()
    print(f"dataset of {len(images)} images drawn in {time.perf_counter() - t0:.0f} s")

    train_vae(vae, images, args, gen, log)
    for p in vae.parameters():
        p.requires_grad_(False)
    raw = encode_dataset(vae, images[:-256])
    scale = float(1 / raw.std())
    vae.register_to_config(scaling_factor=scale)
    log["vae"]["scaling_factor"] = scale

    ema_unet, ema_text = train_unet(
        vae, text_encoder, tokenizer, unet, raw * scale, captions[:-256], args, gen, log
    )

    pipe = make_pipeline(vae, ema_text, tokenizer, ema_unet)
    if args.out.exists():
        shutil.rmtree(args.out)
    with quiet_progress_bars():
        pipe.save_pretrained(args.out, safe_serialization=True)
    write_slow_tokenizer_files(args.out / "tokenizer")
    for path in args.out.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # safetensors writes files owner-only
    log["total_seconds"] = time.perf_counter() - t0
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"wrote {args.out} in {log['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
