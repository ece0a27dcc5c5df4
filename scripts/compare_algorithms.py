"""Compare the DDPO paper's three algorithms (DDPO-IS, DDPO-SF, RWR) on the offline `shapes` model.

Method: every algorithm gets the same sample budget (64 samples an epoch: 4 batches of 16, 10 DDIM
steps; one optimizer step per epoch), the same 24 captions (every 5th of the shapes grammar), the
same reward (default JPEG compressibility) and the same seeds (default 0 1 2), at lr 1e-3 with one
global advantage baseline; everything else is the `tiny` preset's and the config defaults (RWR:
`train.rwr_weighting`, `rwr_temperature` as shipped). That is `--settings plain`, the default;
`--settings shapes-alignment` takes that preset's sampling and training settings instead (5 DDIM
steps, groups of 4 sharing prompt and noise, the 3 noisiest steps trained). Every epoch (and once before training) each
run is evaluated on 2 images per caption from fixed evaluation noise, identical across runs and
evaluations, so before/after differences are paired. Writes docs/NAME.png (evaluation
and training reward vs samples, mean over seeds, band = std) and docs/NAME.md (mean ±
std over seeds of the evaluation reward before and after, and the paired gain). A finished run's
result.json in --output is reused, so adding an algorithm (e.g. the opt-in `ddpo-is-4steps`) only
trains the new runs.

    OMP_NUM_THREADS=1 python scripts/compare_algorithms.py [--epochs 6] [--seeds 0 1 2]
        [--settings plain|shapes-alignment] [--name compare_algorithms]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ddpo_lite.config import ALGORITHMS, load_config  # noqa: E402
from ddpo_lite.shapes import all_captions  # noqa: E402
from ddpo_lite.trainer import train  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
SAMPLES_PER_EPOCH = 64  # sample.batch_size 16 x sample.num_batches_per_epoch 4
COLOURS = {
    "ddpo-is": (31, 119, 180),
    "ddpo-sf": (255, 127, 14),
    "rwr": (44, 160, 44),
    "ddpo-is-4steps": (214, 39, 40),
    "nft": (148, 103, 189),
    "awm": (140, 86, 75),
}
# With one optimizer step per epoch DDPO-IS steps at ratio 1, where its gradient is DDPO-SF's; this
# opt-in variant takes the paper's several importance-weighted steps per round (4 of 16 samples).
VARIANTS = {"ddpo-is-4steps": ("ddpo-is", ["train.gradient_accumulation=1"])}

Curves = dict[str, np.ndarray]  # "eval": (seeds, epochs + 1), "train": (seeds, epochs)


# --settings: "plain" is the first comparison's (10 DDIM steps, every step trained, one global
# baseline, the tiny preset's defaults otherwise); "shapes-alignment" is that preset's (5 steps,
# groups of 4 sharing prompt and noise, the 3 noisiest steps trained: docs/ALGORITHM.md), with CFG 5
# as it was when the published comparison ran (the preset has sampled without CFG since session 6).
PLAIN = [
    "sample.num_steps=10",
    "sample.batch_size=16",
    "sample.num_batches_per_epoch=4",
    "train.batch_size=16",
    "train.gradient_accumulation=4",
    "train.learning_rate=1e-3",
    "advantages.per_prompt_stat_tracking=false",
]
SETTINGS = {
    "plain": ("tiny", ['model.name="shapes"', *PLAIN]),
    "shapes-alignment": ("shapes-alignment", ["sample.guidance_scale=5.0"]),
}


def run_one(
    algorithm: str, seed: int, epochs: int, reward: str, captions: Path, out: Path, settings: str
) -> dict:
    """Train one run (or reuse its finished result.json): its evaluation curve (baseline first),
    training reward curve and seconds."""
    run_dir = out / f"{algorithm}_seed{seed}"
    done = run_dir / "result.json"
    key = {"algorithm": algorithm, "seed": seed, "epochs": epochs, "reward": reward}
    if settings != "plain":
        key["settings"] = settings
    if done.is_file() and (cached := json.loads(done.read_text()))["key"] == key:
        return cached
    base, extra = VARIANTS.get(algorithm, (algorithm, []))
    preset, preset_overrides = SETTINGS[settings]
    start = time.time()
    cfg = load_config(
        preset,
        [
            *preset_overrides,
            f'reward.name="{reward}"',
            f'train.algorithm="{base}"',
            f"num_epochs={epochs}",
            f"seed={seed}",
            f'output_dir="{run_dir}"',
            "log_with=[]",
            "keep_checkpoints=1",
            f'prompts.file="{captions}"',
            "guard.kl_samples=0",
            "eval.every=1",
            f'eval.prompts={{train="{captions}"}}',
            "eval.num_per_prompt=2",
            *extra,
        ],
    )
    result = train(cfg, overwrite=True, show_progress=False)
    baseline = json.loads((result.output_dir / "eval_baseline.json").read_text())
    evals = [baseline["eval_reward_mean"]]
    evals += [m["eval_reward_mean"] for m in result.metrics if "eval_reward_mean" in m]
    train_curve = [m["reward_mean"] for m in result.metrics]
    run = {"key": key, "eval": evals, "train": train_curve, "seconds": time.time() - start}
    done.write_text(json.dumps(run) + "\n")
    return run


def mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std over seeds (axis 0); std 0 for a single seed."""
    return x.mean(0), (x.std(0, ddof=1) if len(x) > 1 else np.zeros(x.shape[1:]))


def table(results: dict[str, Curves], reward: str, epochs: int) -> str:
    """Markdown: evaluation reward before/after and the paired gain, mean ± std over seeds."""
    n = len(next(iter(results.values()))["eval"])
    lines = [
        f"`{reward}` on `shapes`, {epochs} epochs x {SAMPLES_PER_EPOCH} samples, {n} seed(s); "
        "evaluation reward (48 images, fixed noise), mean ± std over seeds",
        "",
        "| algorithm | eval before | eval after | gain (paired) | train reward, last epoch |",
        "| --- | --- | --- | --- | --- |",
    ]
    for algorithm, c in results.items():
        cells = [c["eval"][:, 0], c["eval"][:, -1], c["eval"][:, -1] - c["eval"][:, 0]]
        cells.append(c["train"][:, -1])
        text = [f"{v.mean():.4f} ± {(v.std(ddof=1) if len(v) > 1 else 0.0):.4f}" for v in cells]
        lines.append(f"| {algorithm} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


W, H, L, R, T, B = 520, 380, 70, 15, 35, 50  # panel size and margins (px)


def _px(x: float, y: float, x0: int, x_max: float, lo: float, hi: float) -> tuple[float, float]:
    """Data (samples, reward) to pixel coordinates in the panel starting at x0."""
    return x0 + L + (W - L - R) * x / x_max, T + (H - T - B) * (1 - (y - lo) / (hi - lo))


def plot(results: dict[str, Curves], reward: str, path: Path) -> None:
    """Two panels (evaluation, training reward vs samples) drawn with PIL: mean line, std band."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (2 * W, H), "white")
    draw = ImageDraw.Draw(image, "RGBA")
    for panel, key in enumerate(("eval", "train")):
        x0 = panel * W
        curves = {a: (c[key], 0 if key == "eval" else 1) for a, c in results.items()}
        xs_max = max(SAMPLES_PER_EPOCH * (v.shape[1] - 1 + s) for v, s in curves.values())
        stats = {a: mean_std(v) for a, (v, _) in curves.items()}
        lo = min(float((m - s).min()) for m, s in stats.values())
        hi = max(float((m + s).max()) for m, s in stats.values())
        lo, hi = lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9)

        px = partial(_px, x0=x0, x_max=max(xs_max, 1), lo=lo, hi=hi)
        draw.rectangle([x0 + L, T, x0 + W - R, H - B], outline="black")
        for i in range(5):  # y ticks
            y = lo + (hi - lo) * i / 4
            _, py = px(0, y)
            draw.line([x0 + L - 4, py, x0 + L, py], fill="black")
            draw.text((x0 + 5, py - 6), f"{y:.3f}", fill="black")
        for e in range(0, xs_max + 1, SAMPLES_PER_EPOCH):  # x ticks, one per epoch
            qx, _ = px(e, lo)
            draw.line([qx, H - B, qx, H - B + 4], fill="black")
            draw.text((qx - 8, H - B + 7), str(e), fill="black")
        draw.text((x0 + L + 120, H - 18), "samples consumed", fill="black")
        title = "evaluation reward (fixed noise)" if key == "eval" else "training reward mean"
        draw.text((x0 + L, 10), f"{title}: {reward}", fill="black")
        for k, (algorithm, (m, s)) in enumerate(stats.items()):
            shift = curves[algorithm][1]
            xs = [SAMPLES_PER_EPOCH * (i + shift) for i in range(len(m))]
            colour = COLOURS.get(algorithm, (100, 100, 100))
            band = [px(x, y) for x, y in zip(xs, m + s, strict=True)]
            band += [px(x, y) for x, y in reversed(list(zip(xs, m - s, strict=True)))]
            draw.polygon(band, fill=(*colour, 50))
            width = max(5 - 2 * k, 2)  # earlier lines wider: identical curves stay visible
            draw.line([px(x, y) for x, y in zip(xs, m, strict=True)], fill=colour, width=width)
            for x, y in zip(xs, m, strict=True):
                cx, cy = px(x, y)
                draw.ellipse([cx - width, cy - width, cx + width, cy + width], fill=colour)
            ly = T + 8 + 14 * k
            draw.line([x0 + L + 10, ly + 6, x0 + L + 30, ly + 6], fill=colour, width=3)
            draw.text((x0 + L + 35, ly), algorithm, fill="black")
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--algorithms", nargs="+", default=list(ALGORITHMS), choices=[*ALGORITHMS, *VARIANTS]
    )
    parser.add_argument("--output", type=Path, default=Path("/tmp/compare_algorithms"))
    parser.add_argument("--reward", default="jpeg_compressibility")
    parser.add_argument("--docs", type=Path, default=DOCS, help="where the .png and .md go")
    parser.add_argument("--settings", choices=list(SETTINGS), default="plain")
    parser.add_argument("--name", default="compare_algorithms", help="stem of the .png and .md")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    args.output.mkdir(parents=True, exist_ok=True)
    captions = args.output / "captions.txt"
    captions.write_text("\n".join(all_captions()[::5]) + "\n")
    start = time.time()
    results: dict[str, Curves] = {}
    seconds = 0.0
    for algorithm in args.algorithms:
        runs = []
        for seed in args.seeds:
            run = run_one(
                algorithm, seed, args.epochs, args.reward, captions, args.output, args.settings
            )
            runs.append(run)
            seconds += run["seconds"]
            print(
                f"{algorithm} seed {seed}: eval {run['eval'][0]:.4f} -> {run['eval'][-1]:.4f}, "
                f"train {run['train'][0]:.4f} -> {run['train'][-1]:.4f} ({run['seconds']:.0f} s)",
                flush=True,
            )
        results[algorithm] = {k: np.array([r[k] for r in runs]) for k in ("eval", "train")}
        (args.output / "curves.json").write_text(
            json.dumps({a: {k: v.tolist() for k, v in c.items()} for a, c in results.items()})
        )

    md = f"Settings: `{args.settings}`. " + table(results, args.reward, args.epochs)
    threads = torch.get_num_threads()
    md += f"\n{len(args.seeds) * len(results)} runs, {seconds / 60:.1f} min in all on {threads} CPU thread(s).\n"
    print("\n" + md)
    print(
        f"this invocation: {(time.time() - start) / 60:.1f} min (finished runs in --output are reused)"
    )
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / f"{args.name}.md").write_text(md)
    plot(results, args.reward, args.docs / f"{args.name}.png")
    print(f"wrote {args.docs / args.name}.md and .png")


if __name__ == "__main__":
    main()
