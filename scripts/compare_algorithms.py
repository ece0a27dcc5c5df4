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

`--recipes` (issue 18's comparison) runs named recipes of the shipped `shapes-alignment` task
instead (RECIPES below: the DDPO-IS preset as shipped, DDPO-IS and GRPO at lr 3e-3 on every step,
the NFT preset, AWM at lr 3e-3 on the 3 noisiest steps), each an ordinary `ddpo-lite train`
subprocess (so its peak resident memory is its own), evaluated every 3 epochs on the training
and the held-out captions (8 images a caption, the base model on the same noise: the paired gain
and its standard error). The reference is the DDPO-IS preset's gain after its 24 epochs (mean
over seeds); for each recipe: the gain at equal samples (12 epochs, 768), and the first evaluated
epoch at which the seed's gain reaches the reference (samples and training seconds to it). KL to
the base is measured afterwards for every recipe the same way (its final LoRA, 32 trajectories of
the preset's DDIM sampler at eta 1 on the training captions: `drift.trajectory_kl`), since NFT and
AWM keep no trajectory of their own. Writes docs/NAME.md and docs/NAME.png (gain vs samples).

    OMP_NUM_THREADS=2 python scripts/compare_algorithms.py --recipes --seeds 0 1 2 \
        --name compare_log_prob_free
"""

from __future__ import annotations

import argparse
import contextlib
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


TITLES = ("evaluation reward (fixed noise)", "training reward mean")


def plot(
    results: dict[str, Curves],
    reward: str,
    path: Path,
    every: int = 1,
    train_shift: int = 1,
    titles: tuple[str, str] = TITLES,
) -> None:
    """Two panels ("eval", "train" curves vs samples) drawn with PIL: mean line, std band. A
    curve's points are `every` epochs apart; the "train" one starts `train_shift` points in."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (2 * W, H), "white")
    draw = ImageDraw.Draw(image, "RGBA")
    for panel, key in enumerate(("eval", "train")):
        x0 = panel * W
        curves = {a: (c[key], 0 if key == "eval" else train_shift) for a, c in results.items()}
        step = SAMPLES_PER_EPOCH * every
        xs_max = max(step * (v.shape[1] - 1 + s) for v, s in curves.values())
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
        for e in range(0, xs_max + 1, step):  # x ticks, one per point
            qx, _ = px(e, lo)
            draw.line([qx, H - B, qx, H - B + 4], fill="black")
            draw.text((qx - 8, H - B + 7), str(e), fill="black")
        draw.text((x0 + L + 120, H - 18), "samples consumed", fill="black")
        title = titles[panel]
        draw.text((x0 + L, 10), f"{title}: {reward}", fill="black")
        for k, (algorithm, (m, s)) in enumerate(stats.items()):
            shift = curves[algorithm][1]
            xs = [step * (i + shift) for i in range(len(m))]
            colour = COLOURS.get(algorithm) or RECIPE_COLOURS.get(algorithm, (100, 100, 100))
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


# ---------------------------------------------------------------------------------------------
# --recipes: issue 18's comparison on the shipped shapes-alignment task
# ---------------------------------------------------------------------------------------------

#: recipe -> (preset, overrides, epochs); the first is the reference.
RECIPES = {
    "ddpo-is (preset)": ("shapes-alignment", [], 24),
    "ddpo-is lr 3e-3": (
        "shapes-alignment",
        ["train.learning_rate=3e-3", "train.first_steps=0"],
        12,
    ),
    "grpo lr 3e-3": (
        "shapes-alignment",
        ["train.algorithm=grpo", "train.learning_rate=3e-3", "train.first_steps=0"],
        12,
    ),
    "nft (preset)": ("shapes-alignment-nft", [], 12),
    "awm lr 3e-3": ("shapes-alignment", ["train.algorithm=awm", "train.learning_rate=3e-3"], 12),
}
RECIPE_COLOURS = dict(zip(RECIPES, COLOURS.values(), strict=False))
EVAL_EVERY = 3
GROUPS = ("train", "heldout")


def run_recipe(name: str, seed: int, out: Path) -> dict:
    """One `ddpo-lite train` subprocess (or its finished result.json): per evaluated epoch the
    paired gain and s.e. of each group, the cumulative training seconds, peak RSS, final KL."""
    import subprocess
    import sys

    preset, overrides, epochs = RECIPES[name]
    run_dir = out / f"{name.replace(' ', '_').replace('(', '').replace(')', '')}_seed{seed}"
    done = run_dir / "result.json"
    key = {"recipe": name, "preset": preset, "overrides": overrides, "epochs": epochs, "seed": seed}
    if done.is_file() and (cached := json.loads(done.read_text()))["key"] == key:
        return cached
    sets = [*overrides, f"num_epochs={epochs}", f"seed={seed}", f"eval.every={EVAL_EVERY}"]
    sets += ["log_with=[]", "keep_checkpoints=1", "guard.kl_samples=0"]
    command = [sys.executable, "-m", "ddpo_lite.cli", "train", "--preset", preset]
    command += ["--output", str(run_dir), "--quiet", "--overwrite"]
    command += [x for s in sets for x in ("--set", s)]
    subprocess.run(command, check=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = np.cumsum([r["epoch_seconds"] for r in rows])
    evaluated = [r for r in rows if "eval_train_gain" in r]
    run = {
        "key": key,
        "epochs": [r["epoch"] for r in evaluated],
        "seconds": [float(seconds[r["epoch"] - 1]) for r in evaluated],
        "peak_rss_bytes": max(r["peak_memory_bytes"] for r in rows),
        "kl_to_base": final_kl(preset, run_dir, seed),
    }
    for group in GROUPS:
        run[group] = [r[f"eval_{group}_gain"] for r in evaluated]
        run[group + "_se"] = [r[f"eval_{group}_gain_se"] for r in evaluated]
    done.write_text(json.dumps(run) + "\n")
    return run


@torch.no_grad()
def final_kl(preset: str, run_dir: Path, seed: int, samples: int = 32) -> float:
    """KL(final LoRA || base) along `samples` trajectories of the shapes-alignment preset's DDIM
    sampler (eta 1, 5 steps, no CFG) on its training captions: the same yardstick for every
    recipe, whether or not it keeps a trajectory."""
    from ddpo_lite.drift import trajectory_kl
    from ddpo_lite.sample import load_with_lora
    from ddpo_lite.sampling import rollout
    from ddpo_lite.trainer import load_prompts, make_policy

    config = load_config("shapes-alignment")
    pipe, _ = load_with_lora(run_dir / "lora")
    policy = make_policy(pipe, config, torch.device("cpu"), autocast=contextlib.nullcontext)
    prompts = load_prompts(config.prompts)
    texts = [prompts[i % len(prompts)] for i in range(samples)]
    ids = torch.arange(samples)
    _, trajectory = rollout(policy, texts, ids, torch.Generator().manual_seed(1000 + seed))
    return float(trajectory_kl(policy, trajectory, samples).mean())


def recipes_table(runs: dict[str, list[dict]], reference: dict[str, float]) -> str:
    """Markdown: gain at 12 epochs, samples / seconds to the reference gain, RSS, KL."""
    lines = [
        "| recipe | seeds | train gain, equal samples | held-out gain, equal samples | samples to the "
        "reference (train / held-out) | training s to it | x fewer samples | peak RSS GiB | "
        "KL to base |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base_samples = RECIPES[next(iter(RECIPES))][2] * SAMPLES_PER_EPOCH
    equal = min(epochs for *_, epochs in RECIPES.values())  # every recipe has run this many
    for name, seeds in runs.items():
        cells = [name, str(len(seeds))]
        for group in GROUPS:
            at = [s[group][s["epochs"].index(equal)] for s in seeds]
            se = [s[group + "_se"][s["epochs"].index(equal)] for s in seeds]
            cells.append(" / ".join(f"{g:+.3f} ± {e:.3f}" for g, e in zip(at, se, strict=True)))
        reach, secs = [], []
        for s in seeds:
            hits = []
            for group in GROUPS:
                hit = next((i for i, g in enumerate(s[group]) if g >= reference[group]), None)
                hits.append(hit)
            reach.append(
                " / ".join(
                    "-" if h is None else str(s["epochs"][h] * SAMPLES_PER_EPOCH) for h in hits
                )
            )
            both = None if None in hits else max(hits)
            secs.append("-" if both is None else f"{s['seconds'][both]:.0f}")
        cells += ["; ".join(reach), "; ".join(secs)]
        fewer = []
        for s in seeds:
            hits = [
                next((i for i, g in enumerate(s[g2]) if g >= reference[g2]), None) for g2 in GROUPS
            ]
            fewer.append(
                "-"
                if None in hits
                else f"{base_samples / (s['epochs'][max(hits)] * SAMPLES_PER_EPOCH):.1f}"
            )
        cells.append("; ".join(fewer))
        cells.append(f"{max(s['peak_rss_bytes'] for s in seeds) / 2**30:.2f}")
        cells.append("; ".join(f"{s['kl_to_base']:.3f}" for s in seeds))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def recipes_plot(runs: dict[str, list[dict]], path: Path) -> None:
    """Two panels (training / held-out captions): the paired gain vs samples, mean over seeds
    (band = std), the base model at 0."""
    results = {}
    for name, seeds in runs.items():
        curves = {}
        for panel, group in zip(("eval", "train"), GROUPS, strict=True):
            curves[panel] = np.array([[0.0, *s[group]] for s in seeds])
        results[name] = curves
    titles = ("paired gain, training captions", "paired gain, held-out captions")
    plot(results, "shapes_alignment", path, EVAL_EVERY, 0, titles)


def main_recipes(args) -> None:
    args.output.mkdir(parents=True, exist_ok=True)
    runs = {name: [run_recipe(name, seed, args.output) for seed in args.seeds] for name in RECIPES}
    reference = {
        group: float(np.mean([s[group][-1] for s in runs[next(iter(RECIPES))]])) for group in GROUPS
    }
    threads = torch.get_num_threads()
    equal = min(epochs for *_, epochs in RECIPES.values())
    md = (
        f"Reference: the DDPO-IS preset's gain after 24 epochs ({24 * SAMPLES_PER_EPOCH} samples), "
        f"mean of {len(args.seeds)} seeds: {reference['train']:+.3f} on the training captions, "
        f"{reference['heldout']:+.3f} held-out. Equal samples: epoch {equal} "
        f"({equal * SAMPLES_PER_EPOCH} samples). Per seed (`;`-separated): gain ± s.e. of the paired "
        f"evaluation; samples to the reference is the first evaluated epoch (every {EVAL_EVERY}) "
        "at or above it ('-': not within the run); seconds and 'x fewer samples' are to the epoch "
        f"where both groups have reached it, against the preset's 24 epochs. {threads} thread(s).\n\n"
    )
    md += recipes_table(runs, reference)
    print(md)
    (args.docs / f"{args.name}.md").write_text(md)
    recipes_plot(runs, args.docs / f"{args.name}.png")
    print(f"wrote {args.docs / args.name}.md and .png")


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
    parser.add_argument("--recipes", action="store_true", help="issue 18's comparison (RECIPES)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.recipes:
        main_recipes(args)
        return

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
