"""`ddpo-lite`: the command line. It parses, validates and calls the API; nothing more.

ddpo-lite train --preset tiny [--set train.learning_rate=1e-4 ...] [--output DIR]
ddpo-lite train --resume DIR [--set num_epochs=200]
ddpo-lite sample --lora runs/tiny/lora --prompt "a cat" [--num 4] [--seed 0]
ddpo-lite eval --lora runs/tiny/lora --prompts heldout.txt
ddpo-lite export runs/tiny/lora --output lora_kohya.safetensors
ddpo-lite bench [--estimate] [--json] [--model sd15-random] [--vs-pipeline]
ddpo-lite presets [show NAME]
ddpo-lite rewards
ddpo-lite --version
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.text import Text

from ddpo_lite import __version__
from ddpo_lite.config import ConfigError, list_presets, load_config, preset_path, to_toml

_err = Console(stderr=True, soft_wrap=True)
# no markup on stdout: prompts, paths, preset and reward descriptions print as written
# ("[n] [animals]" is text, not two rich tags); styles come from Text objects
_out = Console(soft_wrap=True, markup=False)


SCALE_HELP = (
    "the LoRA's strength (default 1: as trained; 0: the base model; between: part of the "
    "change, as ComfyUI's strength)"
)
DEVICE_HELP = "torch device, e.g. cuda, cuda:1 or cpu (default: cuda where there is one, else cpu)"
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
DTYPE_HELP = (
    "the models' weights (default auto: bf16 on a GPU, fp16 where it has no bf16; fp32 on cpu)"
)

QUANTIZE_CHOICES = ("none", "nf4", "int8", "fp8")
QUANTIZE_HELP = (
    "the frozen denoiser's weights, as training's memory.quantize_base (nf4 / int8: a GPU with "
    "bitsandbytes; fp8: storage only, any device; default: as trained on a GPU, none on the CPU)"
)
OFFLOAD_HELP = (
    "keep models on the CPU but while they run, so the GPU holds the largest, not all (default: "
    "only where they do not all fit in its free memory)"
)


class UsageError(Exception):
    """A command-line mistake; printed as one line with exit status 2."""


def _train(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.toml").is_file():
            raise UsageError(
                f"--resume {str(run_dir)!r}: no config.toml there, not a ddpo-lite run"
            )
        if args.output and Path(args.output) != run_dir:
            raise UsageError("--resume continues the run in its own folder; drop --output")
        config = load_config(str(run_dir / "config.toml"), overrides)
        config.output_dir = str(run_dir)
        if not args.trust_reward_code:
            _refuse_recorded_reward_code(run_dir, config, overrides)
    else:
        if args.output:
            overrides.append(f"output_dir={_quote(args.output)}")
        config = load_config(args.preset, overrides)  # validated before any model loads
    if args.vram is not None:
        from ddpo_lite.bench import select_for_vram

        config, report = select_for_vram(config, args.vram)
        _out.print(report, highlight=False, markup=False)
    else:
        _warn_if_over_the_card(config)
    from ddpo_lite.trainer import train

    result = train(
        config,
        resume=bool(args.resume),
        overwrite=args.overwrite,
        show_progress=not args.quiet,
    )
    last = result.metrics[-1]
    _out.print(
        f"done: {len(result.metrics)} epochs, last reward mean {last['reward_mean']:.4f}; "
        f"LoRA in {result.lora_dir}"
    )
    if args.export:  # the file ComfyUI reads for this family (kohya keys for SD 1.x / SDXL)
        from ddpo_lite.export import default_export_name, export_lora

        name = default_export_name(result.lora_dir)
        path = export_lora(result.lora_dir, result.output_dir / name)
        _out.print(f"ComfyUI/A1111 LoRA: {path}")
    return 0


def _warn_if_over_the_card(config) -> None:
    """Before the models load: a line when the estimate says the run does not fit this GPU."""
    import torch

    if config.memory.cpu or not torch.cuda.is_available():
        return
    from ddpo_lite.bench import over_card_warning

    card = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory
    warning = over_card_warning(config, card)
    if warning and os.environ.get("RANK", "0") == "0":  # once in a multi-process run
        _err.print(f"[yellow]warning:[/yellow] {_escape(warning)}", highlight=False)


def _refuse_recorded_reward_code(run_dir: Path, config, overrides: list[str]) -> None:
    """A run folder is data, maybe someone else's: a user-code reward its config.toml names
    ('file.py:fn', 'module:fn') is not imported unless the command line names it again (in a
    --set) or --trust-reward-code confirms it."""
    from ddpo_lite.rewards.compose import user_code_names

    unnamed = [
        name for name in user_code_names(config.reward) if not any(name in o for o in overrides)
    ]
    if unnamed:
        raise UsageError(
            f"--resume {str(run_dir)!r}: its config.toml names Python code as the reward "
            f"({unnamed[0]!r}), which resuming would run; if you trust that run folder, pass "
            f"--trust-reward-code (or name the reward again: --set reward.name={_quote(unnamed[0])})"
        )


def _sample(args: argparse.Namespace) -> int:
    from ddpo_lite.sample import read_prompts_file, sample
    from ddpo_lite.trainer import progress_bars

    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += read_prompts_file(args.prompts)
    if not prompts:
        raise UsageError("give at least one --prompt TEXT or a --prompts FILE")
    if args.lora is None and args.model is None:
        raise UsageError("give --lora PATH (or --model NAME to sample the base model)")
    if args.num < 1 or (args.steps is not None and args.steps < 1):
        raise UsageError("--num and --steps must be at least 1")
    if args.resolution is not None and args.resolution < 1:
        raise UsageError(f"--resolution {args.resolution} is invalid: give a size in pixels")
    _check_scale(args)
    if args.guidance_scale is not None and not args.guidance_scale >= 0:
        raise UsageError(
            f"--guidance-scale {args.guidance_scale:g} is invalid: give a number >= 0 "
            "(1 or 0: no classifier-free guidance)"
        )
    _check_device(args.device)
    with progress_bars(_err, enabled=not args.quiet) as progress:
        result = sample(
            args.lora,
            prompts,
            model=args.model,
            num=args.num,
            seed=args.seed,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            output=args.output,
            resolution=args.resolution,
            progress=progress,
            scale=args.scale,
            **_inference_options(args),
        )
    _out.print(f"{len(result.paths)} images and {result.grid} written to {args.output}")
    return 0


def _check_scale(args: argparse.Namespace) -> None:
    if not math.isfinite(args.scale):
        raise UsageError(f"--scale {args.scale:g} is invalid: give the LoRA's strength, e.g. 0.5")
    if args.scale != 1.0 and args.lora is None:
        raise UsageError("--scale sets a LoRA's strength: give --lora PATH")


def _inference_options(args: argparse.Namespace) -> dict:
    """What `sample` and `eval` share: where and how the models run."""
    return dict(device=args.device, dtype=args.dtype, quantize=args.quantize, offload=args.offload)


def _export(args: argparse.Namespace) -> int:
    from ddpo_lite.export import COMFYUI_WEIGHT_NAME, default_export_name, export_lora

    source = Path(args.lora)
    name = default_export_name(source)  # by the family in the LoRA's header
    output = args.output or (source.parent if source.is_dir() else source.parent.parent)
    if args.output is None:
        output = Path(output) / name
    path = export_lora(source, output)
    kind = "ComfyUI" if name == COMFYUI_WEIGHT_NAME else "kohya/A1111/ComfyUI"
    _out.print(f"{kind} LoRA written to {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ddpo_lite.evaluate import compare, evaluate_lora
    from ddpo_lite.trainer import progress_bars

    files = {Path(f).stem: f for f in args.prompts or []}
    if args.num is not None and args.num < 1:
        raise UsageError("--num must be at least 1")
    _check_scale(args)
    _check_device(args.device)
    with progress_bars(_err, enabled=not args.quiet) as progress:
        base, tuned = evaluate_lora(
            args.lora,
            model=args.model,
            prompt_files=files,
            reward_name=args.reward,
            num_per_prompt=args.num,
            seed=args.seed,
            steps=args.steps,
            progress=progress,
            scale=args.scale,
            **_inference_options(args),
        )
    if tuned is None:
        rows = [
            {"group": name, "n": int(g.rewards.size), "base": g.mean, "base_std": g.std}
            for name, g in base.items()
        ]
    else:
        rows = compare(base, tuned)
    if args.json:
        finite = [{k: (None if v != v else v) for k, v in row.items()} for row in rows]  # NaN
        Path(args.json).write_text(json.dumps({"lora": args.lora, "groups": finite}, indent=2))
    table = Table(title="held-out evaluation" + (f": {args.lora}" if args.lora else ""))
    if tuned is None:
        for column in ("group", "n", "base mean", "base std"):
            table.add_column(column)
        for row in rows:
            table.add_row(
                row["group"], str(row["n"]), f"{row['base']:.4g}", f"{row['base_std']:.4g}"
            )
    else:
        for column in ("group", "n", "base", "tuned", "tuned - base", "std. error"):
            table.add_column(column)
        for row in rows:
            table.add_row(
                row["group"],
                str(row["n"]),
                f"{row['base']:.4g}",
                f"{row['tuned']:.4g}",
                f"{row['difference']:+.4g}",
                f"{row['standard_error']:.2g}",
            )
    _out.print(table)
    return 0


def _bench(args: argparse.Namespace) -> int:
    # the bench's own parser: building it imports torch and diffusers, so only when asked
    from ddpo_lite.bench import add_bench_arguments, run_bench

    parser = argparse.ArgumentParser(
        prog="ddpo-lite bench",
        description="Measure peak memory and speed per phase (sampling, reward, training), or "
        "predict them without running (--estimate).",
    )
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(args.bench_args))


def _presets(args: argparse.Namespace) -> int:
    import tomllib

    if args.action == "show":
        if not args.name:
            raise UsageError("usage: ddpo-lite presets show NAME")
        _out.print(to_toml(load_config(args.name)), markup=False, highlight=False)
        return 0
    if args.action:
        raise UsageError(
            f"unknown presets action {args.action!r}; use `ddpo-lite presets show NAME`"
        )
    for name in list_presets():
        data = tomllib.loads(preset_path(name).read_text())
        _out.print(Text.assemble((f"{name:<20}", "bold"), " ", data.get("description", "")))
    return 0


def _rewards(args: argparse.Namespace) -> int:
    from ddpo_lite.rewards import list_rewards

    for name, description in list_rewards().items():
        _out.print(Text.assemble((f"{name:<24}", "bold"), " ", description))
    return 0


def _check_device(device: str | None) -> None:
    """A torch device this build and machine have, before any model loads."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--device {device!r} is not a torch device; e.g. cpu, cuda, cuda:1"
        ) from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = "has no CUDA" if torch.version.cuda is None else "sees no CUDA GPU"
        raise UsageError(
            f"--device {device}: this torch build ({torch.__version__}) {why}; use --device cpu"
        )
    if kind == "cuda" and torch.device(device).index is not None:
        if torch.device(device).index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpo-lite",
        description="Fine-tune text-to-image models (SD 1.x, SDXL, SD3.5, FLUX) with reinforcement "
        "learning (DDPO, GRPO, DiffusionNFT, AWM) by training a LoRA.",
    )
    parser.add_argument("--version", action="version", version=f"ddpo-lite {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a LoRA with RL",
        description="Train from a preset (DDPO, GRPO, DiffusionNFT or AWM), or resume a run.",
    )
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--preset", help="preset name (see `ddpo-lite presets`) or a path to a .toml file"
    )
    source.add_argument(
        "--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint"
    )
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. train.learning_rate=1e-4 (repeatable)",
    )
    train.add_argument("--output", metavar="DIR", help="output folder (default: the preset's)")
    train.add_argument(
        "--overwrite", action="store_true", help="replace a previous run in the output folder"
    )
    train.add_argument(
        "--quiet", action="store_true", help="no progress bars: one plain line per epoch"
    )
    train.add_argument(
        "--trust-reward-code",
        action="store_true",
        help="with --resume: run the user-code reward ('file.py:fn') that the run's config names",
    )
    train.add_argument(
        "--export",
        choices=["kohya", "comfyui"],
        help="also write the file ComfyUI/A1111 read at the end: lora_kohya.safetensors for "
        "SD 1.x/SDXL, lora_comfyui.safetensors for SD3/FLUX (docs/COMFYUI.md); either name "
        "picks the family's format",
    )
    train.add_argument(
        "--vram",
        type=float,
        metavar="GB",
        help="choose memory settings that fit this accelerator budget (from the estimate)",
    )
    train.set_defaults(func=_train)

    sample = commands.add_parser(
        "sample",
        help="generate images with a trained LoRA",
        description="Generate images with a LoRA on the base model recorded in it.",
    )
    sample.add_argument("--lora", metavar="PATH", help="LoRA folder or .safetensors file")
    sample.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    sample.add_argument("--prompts", metavar="FILE", help="a file with one prompt per line")
    sample.add_argument("--model", help="base model (default: the one the LoRA was trained on)")
    sample.add_argument("--num", type=int, default=4, help="images per prompt (default 4)")
    sample.add_argument("--seed", type=int, default=0, help="image k uses seed + k (default 0)")
    sample.add_argument("--scale", type=float, default=1.0, help=SCALE_HELP)
    sample.add_argument("--steps", type=int, help="sampling steps (default: as trained)")
    sample.add_argument("--guidance-scale", type=float, help="CFG scale (default: as trained)")
    sample.add_argument(
        "--resolution", type=int, metavar="PX", help="square image size (default: as trained)"
    )
    sample.add_argument("--device", help=DEVICE_HELP)
    sample.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)
    sample.add_argument("--quantize", choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    sample.add_argument("--offload", action=argparse.BooleanOptionalAction, help=OFFLOAD_HELP)
    sample.add_argument("--quiet", action="store_true", help="no progress bar")
    sample.add_argument(
        "--output", default="samples", metavar="DIR", help="output folder (default: samples)"
    )
    sample.set_defaults(func=_sample)

    evaluate = commands.add_parser(
        "eval",
        help="compare a LoRA with its base model on held-out prompts",
        description="Evaluate the base model and the LoRA on the same noise, per prompt group: "
        "means, the difference and its standard error.",
    )
    evaluate.add_argument("--lora", metavar="PATH", help="LoRA folder or file (omit: base only)")
    evaluate.add_argument("--model", help="base model (default: the one in the LoRA)")
    evaluate.add_argument(
        "--prompts",
        action="append",
        metavar="FILE",
        help="a prompt group, one prompt per line (repeatable; default: the preset's [eval])",
    )
    evaluate.add_argument("--reward", help="reward name (default: the one the LoRA trained on)")
    evaluate.add_argument(
        "--num", type=int, help="images per prompt (default: the run's eval.num_per_prompt, or 4)"
    )
    evaluate.add_argument(
        "--seed", type=int, help="prompt j uses seed + j (default: the run's eval.seed, or 20231)"
    )
    evaluate.add_argument("--steps", type=int, help="DDIM steps (default: as trained)")
    evaluate.add_argument("--device", help=DEVICE_HELP)
    evaluate.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)
    evaluate.add_argument("--quantize", choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    evaluate.add_argument("--scale", type=float, default=1.0, help=SCALE_HELP)
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.add_argument(
        "--json", metavar="FILE", help="also write the table's numbers to FILE (JSON)"
    )
    evaluate.add_argument(
        "--offload",
        action=argparse.BooleanOptionalAction,
        help="keep the text encoders on the CPU but while they encode (default: only where the "
        "models do not all fit in the GPU's free memory)",
    )
    evaluate.set_defaults(func=_eval)

    export = commands.add_parser(
        "export",
        help="write a LoRA file for ComfyUI / AUTOMATIC1111 (kohya keys; SD3 / FLUX: ComfyUI's)",
        description="Convert a ddpo-lite (diffusers-format) LoRA to one kohya-format file.",
    )
    export.add_argument("lora", metavar="LORA", help="LoRA folder or .safetensors file")
    export.add_argument(
        "--output",
        metavar="FILE",
        help="default: lora_kohya.safetensors (SD 1.x/SDXL) or lora_comfyui.safetensors "
        "(SD3/FLUX) beside the LoRA folder",
    )
    export.set_defaults(func=_export)

    presets = commands.add_parser(
        "presets",
        help="list the shipped presets, or show one",
        description="`ddpo-lite presets` lists them; `ddpo-lite presets show NAME` prints the "
        "fully resolved TOML.",
    )
    presets.add_argument("action", nargs="?", choices=["show"], help="show one preset")
    presets.add_argument("name", nargs="?", help="preset name")
    presets.set_defaults(func=_presets)

    serve = commands.add_parser(
        "serve-reward",
        help="serve a reward over HTTP (JSON + PNG) for runs on other GPUs or machines",
        description="Serve a registered reward: POST /score with base64 PNG images, GET /health. "
        "Point a run at it with --set reward.url='http://HOST:PORT'.",
    )
    from ddpo_lite.rewards.server import add_arguments, run_from_args

    add_arguments(serve)
    serve.set_defaults(func=run_from_args)

    bench = commands.add_parser(
        "bench",
        help="measure or predict memory and speed (`ddpo-lite bench --help`)",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)

    rewards = commands.add_parser("rewards", help="list the built-in rewards")
    rewards.set_defaults(func=_rewards)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ddpo_lite import _quiet

    _quiet.install()  # known-harmless library log lines, before the libraries are imported
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the bench parses its own options (--help included)
        args = argparse.Namespace(func=_bench, bench_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        _err.print(f"[red]config error:[/red] {_escape(err)}", highlight=False)
        return 2
    except KeyboardInterrupt:
        kept = {
            "train": "; the last checkpoint is intact (continue with --resume)",
            "sample": f"; the images made so far are in {args.output}",
        }
        _err.print(f"interrupted{kept.get(args.command, '')}", highlight=False)
        return 130
    except Exception as err:
        if _is_user_error(err):
            _err.print(f"[red]error:[/red] {_escape(err)}", highlight=False)
            return 2
        import torch

        if isinstance(err, torch.OutOfMemoryError):  # sample / eval (a training run says more)
            first = str(err).strip().splitlines()[0] if str(err).strip() else "out of memory"
            _err.print(
                f"[red]error:[/red] {_escape(first)}; use less memory: fewer images at once "
                "(--num), --offload, --quantize nf4 or fp8 for the denoiser, --dtype bf16 / fp16",
                highlight=False,
            )
            return 2
        raise


def _escape(err: BaseException) -> str:
    from rich.markup import escape

    return escape(str(err))


def _is_user_error(err: BaseException) -> bool:
    """Errors a user can cause and fix: printed as one line, never a traceback."""
    from ddpo_lite.checkpoint import CheckpointError
    from ddpo_lite.lora_files import LoraFileError
    from ddpo_lite.models import ModelLoadError
    from ddpo_lite.models.memory import MissingDependencyError
    from ddpo_lite.rewards import UnknownRewardError
    from ddpo_lite.rewards._models import RewardModelError
    from ddpo_lite.rewards.compose import RewardError
    from ddpo_lite.trainer import OutOfMemoryStop

    user_errors = (
        UsageError,
        OutOfMemoryStop,
        CheckpointError,
        ModelLoadError,
        MissingDependencyError,
        UnknownRewardError,
        LoraFileError,
        RewardError,
        RewardModelError,
        FileNotFoundError,
    )
    return isinstance(err, user_errors)


if __name__ == "__main__":
    sys.exit(main())
