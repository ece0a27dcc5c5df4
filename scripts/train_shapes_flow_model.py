"""Train the `shapes-flow` model: a Stable Diffusion 3 architecture in miniature on the shapes world.

The flow-matching sibling of `shapes` (scripts/train_shapes_model.py), so that Flow-GRPO has an
offline model that can get better at following prompts. What it does, top to bottom (all seeded by
--seed):

1. draws a dataset of procedural images with their captions (`ddpo_lite.shapes.world`);
2. reuses the shipped `shapes` VAE (frozen) and sets SD3's latent normalisation from the dataset:
   shift_factor = mean, scaling_factor = 1 / std of the posterior means, so that the pipeline's
   decode (latents / scaling_factor + shift_factor) inverts (z - shift) * scale;
3. builds two CLIPTextModelWithProjection encoders: the first seeded from the `shapes` text
   encoder's weights (width 64), the second random (width 32); SD3's pipeline concatenates their
   penultimate hidden states (joint width 96) and their pooled projections (96);
4. trains an SD3Transformer2DModel (MMDiT: 4 joint blocks, width 96, patch 2 -> 64 image tokens)
   and both text encoders together on the rectified-flow loss: x_t = (1 - s) x_0 + s e, target
   e - x_0, with s from a logit-normal(0, 1) mapped through SD3's shift (3.0, as the scheduler
   samples), 10% empty captions (classifier-free guidance dropout), an EMA of all three;
5. every --save-every steps writes the EMA weights as a diffusers `StableDiffusion3Pipeline`
   folder (so a result exists if time runs out) and `training_log.json`; --max-minutes stops
   training early at a checkpoint.

No T5: the pipeline's T5 slot is empty and the model is trained with no T5 tokens at all
(`max_sequence_length=0`; the pipeline's default appends 256 zero tokens, which cost 3.5x the
step time on one CPU thread). ddpo-lite's sd3 family encodes this model that way
(`model.max_sequence_length`, whose default -1 resolves to `pipe.t5_sequence_length = 0`, set by
`load_pipeline("shapes-flow")`); in plain diffusers call `pipe(prompt, max_sequence_length=0)`.

Run (the shipped weights; see ddpo_lite/models/shapes_flow_model/README.md for the measured time):

    OMP_NUM_THREADS=1 python scripts/train_shapes_flow_model.py --seed 0 \
        --out ddpo_lite/models/shapes_flow_model
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
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ddpo_lite.models.loading import SHAPES_MODEL_DIR
from ddpo_lite.models.tiny import quiet_progress_bars
from ddpo_lite.rewards.shapes import alignment_scores
from ddpo_lite.shapes.evaluate import attribute_hits, eval_captions
from ddpo_lite.shapes.model import (
    LATENT_CHANNELS,
    LATENT_SIZE,
    MAX_TOKENS,
    build_tokenizer,
    write_slow_tokenizer_files,
)
from ddpo_lite.shapes.world import random_spec, render

SHIFT = 3.0  # SD3's scheduler shift, used for training and sampling alike
WIDTH_2 = 32  # the second CLIP's width (the first keeps the shapes encoder's 64)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("ddpo_lite/models/shapes_flow_model"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--dataset-size", type=int, default=24000)
    p.add_argument("--steps", type=int, default=5600)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=96, help="transformer width (16 per head)")
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--save-every", type=int, default=700, help="checkpoint (EMA) every N steps")
    p.add_argument("--eval-samples", type=int, default=64, help="per checkpoint; 0 disables")
    p.add_argument("--max-minutes", type=float, default=44.0, help="stop at the next checkpoint")
    return p.parse_args()


def lr_at(step: int, total: int, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def make_dataset(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """(images (n, 3, 32, 32) in [-1, 1], captions) drawn by the procedural renderer."""
    rng = np.random.default_rng(seed)
    specs = [random_spec(rng) for _ in range(n)]
    pixels = np.stack([np.asarray(render(s)) for s in specs])  # (n, 32, 32, 3) uint8
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, [s.caption for s in specs]


def text_config(tokenizer, width: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_text_encoders(tokenizer):
    """CLIP-L's stand-in seeded from the shapes text encoder (its projection random), CLIP-G's random."""
    shapes_text = CLIPTextModel.from_pretrained(SHAPES_MODEL_DIR / "text_encoder")
    first = CLIPTextModelWithProjection(shapes_text.config)
    missing, unexpected = first.text_model.load_state_dict(shapes_text.state_dict())
    assert not missing and not unexpected, (missing, unexpected)
    second = CLIPTextModelWithProjection(text_config(tokenizer, WIDTH_2))
    return first, second


def build_transformer(layers: int, width: int, text_width: int) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=layers,
        attention_head_dim=16,
        num_attention_heads=width // 16,
        joint_attention_dim=text_width,
        caption_projection_dim=width,
        pooled_projection_dim=text_width,
        pos_embed_max_size=LATENT_SIZE,
    )


def encode(encoders, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `StableDiffusion3Pipeline.encode_prompt(..., max_sequence_length=0)` computes, with
    gradients: (prompt_embeds (B, 16, 96), pooled (B, 96)) from token ids (B, 16)."""
    embeds, pooled = [], []
    for encoder in encoders:
        out = encoder(ids, output_hidden_states=True)
        embeds.append(out.hidden_states[-2])  # penultimate layer, as the pipeline takes it
        pooled.append(out.text_embeds)
    return torch.cat(embeds, dim=-1), torch.cat(pooled, dim=-1)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


def make_pipeline(vae, encoders, tokenizer, transformer) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=copy.deepcopy(tokenizer),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def evaluate(pipe, n: int, seed: int = 1234) -> dict[str, float]:
    """Attribute accuracy from pixels (with the shuffled-caption chance) and the mean
    shapes_alignment reward, at CFG 4.5 and at CFG 1, 10 Euler steps."""
    prompts = eval_captions(n, seed)
    shuffled = [prompts[i] for i in np.random.default_rng(seed + 1).permutation(n)]
    result: dict[str, float] = {}
    for cfg in (4.5, 1.0):
        generator = torch.Generator().manual_seed(seed)
        images = pipe(
            prompts,
            num_inference_steps=10,
            guidance_scale=cfg,
            generator=generator,
            max_sequence_length=0,
        ).images
        right, chance = attribute_hits(images, prompts), attribute_hits(images, shuffled)
        tag = f"cfg{cfg:g}"
        for name in right:
            result[f"{tag}_{name}"] = float(right[name].mean())
            result[f"{tag}_{name}_chance"] = float(chance[name].mean())
        scores = alignment_scores(images, prompts)
        result[f"{tag}_alignment"] = float((scores["colour"] + scores["shape"]).mean())
        shuffled_scores = alignment_scores(images, shuffled)
        result[f"{tag}_alignment_chance"] = float(
            (shuffled_scores["colour"] + shuffled_scores["shape"]).mean()
        )
    return result


def save(pipe, out: Path, log: dict) -> None:
    """Write the pipeline folder through a temporary sibling and a rename (a checkpoint is whole)."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    with quiet_progress_bars():
        pipe.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        write_slow_tokenizer_files(tmp / name)
    (tmp / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    for path in tmp.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # safetensors writes files owner-only
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


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
    print(f"dataset of {len(images)} images drawn in {time.perf_counter() - t0:.0f} s", flush=True)

    # 2. the shapes VAE, frozen, with SD3's shift and scale from the latents' statistics
    vae = AutoencoderKL.from_pretrained(SHAPES_MODEL_DIR / "vae").eval().requires_grad_(False)
    with torch.no_grad():
        raw = torch.cat([vae.encode(c).latent_dist.mean for c in images.split(512)])
    shift, scale = float(raw.mean()), float(1 / raw.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (raw - shift) * scale  # (n, 4, 16, 16), zero mean, unit std
    log["vae"] = {"source": "shapes_model/vae", "shift_factor": shift, "scaling_factor": scale}
    print(f"latents encoded: shift {shift:.4f} scale {scale:.4f}", flush=True)

    # 3-4. text encoders and transformer, trained together
    tokenizer = build_tokenizer()
    torch.manual_seed(args.seed)
    encoders = build_text_encoders(tokenizer)
    text_width = sum(e.config.hidden_size for e in encoders)
    transformer = build_transformer(args.layers, args.width, text_width)
    counts = {
        "transformer": sum(p.numel() for p in transformer.parameters()),
        "text_encoder": sum(p.numel() for p in encoders[0].parameters()),
        "text_encoder_2": sum(p.numel() for p in encoders[1].parameters()),
    }
    log["parameters"] = counts
    print(f"parameters: {counts}", flush=True)

    ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", return_tensors="pt").input_ids  # (1, 16)
    modules = [transformer, *encoders]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.steps))
    emas = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
    for m in modules:
        m.train()
    n_train = len(latents) - 256
    log["train"] = {"loss": [], "eval": [], "checkpoints": []}
    start = time.perf_counter()
    running = 0.0
    for step in range(args.steps):
        idx = torch.randint(n_train, (args.batch_size,), generator=gen)
        x0 = latents[idx]  # (B, 4, 16, 16)
        tokens = ids[idx].clone()  # (B, 16)
        drop = torch.rand(args.batch_size, generator=gen) < args.cfg_dropout
        tokens[drop] = empty
        # sigma: logit-normal(0, 1), then SD3's shift (s -> shift s / (1 + (shift - 1) s))
        u = torch.sigmoid(torch.randn(args.batch_size, generator=gen))
        sigma = SHIFT * u / (1 + (SHIFT - 1) * u)  # (B,)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        embeds, pooled = encode(encoders, tokens)
        velocity = transformer(
            hidden_states=xt,
            timestep=sigma * 1000,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        loss = F.mse_loss(velocity, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        for e, m in zip(emas, modules, strict=True):
            ema_update(e, m, decay)
        running += loss.item()
        if (step + 1) % 100 == 0:
            elapsed = time.perf_counter() - start
            log["train"]["loss"].append([step + 1, running / 100, round(elapsed, 1)])
            print(f"step {step + 1} loss {running / 100:.4f} ({elapsed:.0f} s)", flush=True)
            running = 0.0
        last = step + 1 == args.steps
        out_of_time = (time.perf_counter() - t0) / 60 > args.max_minutes
        if (step + 1) % args.save_every == 0 or last or out_of_time:
            pipe = make_pipeline(vae, emas[1:], tokenizer, emas[0])
            if args.eval_samples:
                acc = evaluate(pipe, args.eval_samples)
                log["train"]["eval"].append({"step": step + 1, **acc})
                print(f"eval at step {step + 1}: {json.dumps(acc)}", flush=True)
            log["train"]["seconds"] = time.perf_counter() - start
            log["train"]["steps_done"] = step + 1
            log["total_seconds"] = time.perf_counter() - t0
            log["train"]["checkpoints"].append([step + 1, round(log["total_seconds"], 1)])
            save(pipe, args.out, log)
            print(
                f"checkpoint at step {step + 1} ({log['total_seconds'] / 60:.1f} min)", flush=True
            )
            if out_of_time:
                print(f"stopping: past --max-minutes {args.max_minutes}", flush=True)
                break
    print(f"wrote {args.out} in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
