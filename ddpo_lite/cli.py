"""`ddpo-lite`: the command line. It parses, validates and calls the API; nothing more.

ddpo-lite train --preset tiny [--set train.learning_rate=1e-4 ...] [--output DIR]
ddpo-lite presets
ddpo-lite --version
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from ddpo_lite import __version__
from ddpo_lite.config import ConfigError, list_presets, load_config, preset_path

_err = Console(stderr=True)


def _train(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if args.output:
        overrides.append(f"output_dir={_quote(args.output)}")
    config = load_config(args.preset, overrides)  # validated before any model loads
    from ddpo_lite.trainer import train

    result = train(config)
    last = result.metrics[-1]
    Console().print(
        f"done: {len(result.metrics)} epochs, last reward mean {last['reward_mean']:.4f}; "
        f"LoRA in {result.lora_dir}"
    )
    return 0


def _presets(args: argparse.Namespace) -> int:
    import tomllib

    console = Console()
    for name in list_presets():
        data = tomllib.loads(preset_path(name).read_text())
        console.print(f"[bold]{name}[/bold]  {data.get('description', '')}")
    return 0


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpo-lite", description="Fine-tune Stable Diffusion with DDPO by training a LoRA."
    )
    parser.add_argument("--version", action="version", version=f"ddpo-lite {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run DDPO training from a preset")
    train.add_argument(
        "--preset", required=True, help="preset name (see `ddpo-lite presets`) or a .toml path"
    )
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. train.learning_rate=1e-4",
    )
    train.add_argument("--output", help="output folder (default: the preset's output_dir)")
    train.set_defaults(func=_train)

    presets = commands.add_parser("presets", help="list the shipped presets")
    presets.set_defaults(func=_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        _err.print(f"[red]config error:[/red] {err}")
        return 2
    except KeyboardInterrupt:
        _err.print("interrupted; the last saved LoRA is intact")
        return 130
    except Exception as err:
        from ddpo_lite.models import ModelLoadError
        from ddpo_lite.models.memory import MissingDependencyError
        from ddpo_lite.rewards import UnknownRewardError

        if isinstance(err, ModelLoadError | MissingDependencyError | UnknownRewardError):
            _err.print(f"[red]error:[/red] {err}")
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
