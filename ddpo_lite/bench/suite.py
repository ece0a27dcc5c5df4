"""Every shipped GPU preset benchmarked in one command: memory per phase beside its estimate,
speed, and the rollout against the family's own diffusers pipeline.

    python -m ddpo_lite.bench.suite --out bench_out                  # a GPU: scripts/gpu_bench.sh
    python -m ddpo_lite.bench.suite --cpu --tiny --out /tmp/bench    # the tiny models, seconds

Each preset runs in its own subprocess (`--worker`) with its own timeout, inside one budget
(`--budget-s`), one preset per family first. The JSON (`bench.json`) and the markdown tables
(`bench.md`, what docs/BENCHMARKS.md takes) are rewritten after every preset, so what finished
survives a kill; a preset that fails, runs out of time or is skipped is recorded with why.

Method, per preset (`bench_config`): the preset with all its levers (resolution, steps, CFG,
batch sizes, micro-batch, timestep chunk, checkpointing, 8-bit Adam, quantize_base, offloads)
on the published architecture with random weights (`*-random`, built on the GPU, nothing
downloaded; `--tiny`: the tiny models at their own size), but one sampling batch per epoch and
gradient accumulation cut so that the epoch is one optimizer step; 2 epochs, the first burn-in.
The estimate (estimate.py) is computed for that same reduced config. Then, for the first preset
of each family, `vs_pipeline` at the same settings (steps capped by `--pipeline-steps`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

#: Most important first: one preset per family (the cheaper first: at 1024 px, 40 steps with CFG
#: sdxl-aesthetic is the slowest), then the rest.
GPU_PRESETS = (
    "aesthetic",
    "sd35-pickscore",
    "flux2-pickscore",
    "flux-pickscore",
    "sdxl-aesthetic",
    "aesthetic-8gb",
    "aesthetic-6gb",
    "compressibility",
    "sdxl-pickscore",
    "sd35-ocr",
    "incompressibility",
    "prompt-alignment",
    "counting",
)
#: Presets that measure what another measures; not run when that one was (earlier in the order).
STANDS_FOR = {
    "incompressibility": (
        "compressibility",
        "the same model, levers and CPU-only JPEG reward: the same memory and speed",
    ),
    "prompt-alignment": (
        "aesthetic",
        "its LLaVA reward has no random stand-in; the estimate counts it as the aesthetic "
        "preset's CLIP ViT-L/14, with the same levers",
    ),
    "counting": ("aesthetic", "as prompt-alignment (the same reward and levers)"),
}
RANDOM_MODELS = {
    "sd1": "sd15-random",
    "sdxl": "sdxl-random",
    "sd3": "sd35-random",
    "flux": "flux-dev-random",
    "flux2": "flux2-klein-random",
}
TINY_MODELS = {
    "sd1": "tiny",
    "sdxl": "tiny-sdxl",
    "sd3": "tiny-sd3",
    "flux": "tiny-flux",
    "flux2": "tiny-flux2",
}
#: A preset does not start with less than this many seconds of the budget left.
MIN_START_S = 20.0
PHASES = ("sampling", "reward", "training")


# ---------------------------------------------------------------------------------------------
# one preset (the worker)
# ---------------------------------------------------------------------------------------------


def preset_family(config) -> str:
    """The family a preset's model belongs to, by name (as the estimate tells them apart)."""
    from ddpo_lite.bench.estimate import is_flux, is_flux2, is_sd3, is_sdxl

    for name, test in (("flux2", is_flux2), ("flux", is_flux), ("sd3", is_sd3), ("sdxl", is_sdxl)):
        if test(config):
            return name
    return "sd1"


def bench_config(preset: str, tiny: bool, cpu: bool, output_dir: str):
    """The preset as the suite runs it, and notes on what was changed besides the epoch's size
    (see the module docstring)."""
    from ddpo_lite.config import load_config

    config = load_config(preset)
    family = preset_family(config)
    memory, sample = config.memory, config.sample
    model = (TINY_MODELS if tiny else RANDOM_MODELS)[family]
    # one sampling batch per epoch (tiny: one training batch), one optimizer step
    samples = config.train.batch_size if tiny else sample.batch_size
    overrides = [
        f'model.name="{model}"',
        f'output_dir="{output_dir}"',
        "log_with=[]",
        "sample.num_batches_per_epoch=1",
        f"train.gradient_accumulation={max(1, math.ceil(samples / config.train.batch_size))}",
    ]
    notes = [
        f"epoch cut to 1 sampling batch of {samples} (the preset: {sample.num_batches_per_epoch} "
        f"batches of {sample.batch_size}) and one optimizer step",
    ]
    if tiny:  # a test of the plumbing, in seconds: the tiny model's size, 2 steps, 8 prompts,
        # one training batch
        steps = min(sample.num_steps, 2)
        overrides += ["sample.resolution=0", f"sample.num_steps={steps}"]
        overrides += [f"sample.batch_size={samples}"]
        if sample.group_size > 1:
            overrides.append(f"sample.group_size={math.gcd(sample.group_size, samples)}")
        if sample.sde_window_size:
            size = min(sample.sde_window_size, steps)
            overrides.append(f"sample.sde_window_size={size}")
            overrides.append(
                f"sample.sde_window_range={min(sample.sde_window_range, steps - size + 1)}"
            )
        from ddpo_lite.trainer import load_prompts

        prompts = load_prompts(config.prompts)[:8]  # encoding 135 prompts on a CPU: seconds
        overrides += ['prompts.file=""', f"prompts.prompts={json.dumps(prompts)}"]
        notes.append(
            f"tiny: the tiny model at its own size, {steps} steps, {len(prompts)} prompts, "
            f"sampling batch {samples}"
        )
        targets = config.lora.target_modules
        kept = [t for t in targets if not re.search(r"blocks\.[1-9]\d*\.", t)]
        if kept != targets:  # a published model's blocks 1.. that the tiny one does not have
            overrides.append(f"lora.target_modules={json.dumps(kept)}")
            notes.append("tiny: LoRA targets named in blocks beyond the first dropped")
    if cpu:
        overrides += ["memory.cpu=true", 'memory.mixed_precision="no"']
        if memory.quantize_base in ("nf4", "int8"):
            overrides.append('memory.quantize_base="none"')
            notes.append(f"quantize_base {memory.quantize_base} needs CUDA: run unquantized")
    if not cpu and memory.encode_on_cpu and memory.offload_text_encoder:
        overrides.append("memory.encode_on_cpu=false")
        notes.append(
            "prompts encoded on the GPU, the encoders offloaded after (encode_on_cpu would take "
            "minutes for T5-XXL / Qwen3-4B; encoding is no measured phase)"
        )
    return load_config(preset, overrides), family, notes


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)  # a reader (or a kill) never sees half a file


def run_preset(
    preset: str,
    part: Path,
    *,
    tiny: bool = False,
    cpu: bool = False,
    epochs: int = 2,
    compared: tuple[str, ...] = (),
    pipeline_steps: int = 10,
    repeats: int = 1,
) -> dict:
    """Benchmark one preset; `part` holds the result so far after each stage. The pipeline
    comparison runs unless the preset's family is in `compared`."""
    import dataclasses

    result: dict = {"preset": preset, "status": "running", "stage": "setup"}
    _write_json(part, result)
    with tempfile.TemporaryDirectory(prefix="ddpo-bench-run-") as output_dir:
        config, family, notes = bench_config(preset, tiny, cpu, output_dir)
        result.update(family=family, model=config.model.name, notes=notes)
        if config.memory.quantize_base in ("nf4", "int8"):
            from ddpo_lite.models.loading import ModelLoadError, check_bitsandbytes

            try:
                check_bitsandbytes(config.memory.quantize_base)
            except ModelLoadError as err:  # not this preset's failure: this machine's
                result.update(status="skipped", stage="setup", error=str(err))
                _write_json(part, result)
                return result
        from ddpo_lite.bench.bench import Run, measure, vs_pipeline
        from ddpo_lite.bench.estimate import ALLOCATOR_OVERHEAD

        start = time.perf_counter()
        run = Run(config, None)
        result["setup_seconds"] = time.perf_counter() - start
        result["resolution"] = run.policy.resolution
        estimated = config
        if config.memory.use_8bit_adam and run.optimizer_name != "AdamW8bit":
            notes.append(f"8-bit Adam cannot run here: {run.optimizer_name} (estimated as such)")
            estimated = dataclasses.replace(
                config, memory=dataclasses.replace(config.memory, use_8bit_adam=False)
            )
        result["stage"] = "estimate"
        _write_json(part, result)
        result["estimate"] = _estimate(estimated, tiny)
        result["estimate_reserved_factor"] = 1 + ALLOCATOR_OVERHEAD  # reserved = allocated x it
        result["stage"] = "measure"
        _write_json(part, result)
        result["measurement"] = measure(config, epochs, run=run)
        if family not in compared:
            result["stage"] = "vs-pipeline"
            _write_json(part, result)
            steps = min(pipeline_steps, config.sample.num_steps)
            result["vs_pipeline"] = vs_pipeline(
                config, None, repeats, run=run, steps=steps, burn_in=False
            )
    result["status"], result["stage"] = "ok", "done"
    _write_json(part, result)
    return result


def _estimate(config, tiny: bool) -> dict:
    """The estimate of `config`; on the tiny models with the tiny reward towers the run scores
    with (the estimate would count the published CLIP towers)."""
    from ddpo_lite.bench.bench import random_clip
    from ddpo_lite.bench.estimate import VIT_H_REWARDS, _reward_names, build_meta_models, estimate

    models = build_meta_models(config)
    if tiny and models.reward is not None:
        vit_h = any(r in VIT_H_REWARDS for r in _reward_names(config))
        vision, text = random_clip("meta", vit_h, tiny=True)
        models.reward = vision.to(models.reward_dtype).eval()
        models.reward_text = None if text is None else text.to(models.reward_dtype).eval()
    return estimate(config, models=models).to_dict()


def exit_with_driver(driver_pid: int, poll_s: float = 1.0) -> None:
    """Kill this worker's process group once the driver that started it is gone.

    The driver starts each worker in its own session, so that a timeout kills the worker's
    children with it; a driver killed outright (SIGKILL) can kill nothing, and the worker would
    run on, holding the GPU. So the worker watches its parent: once it is reparented, it goes.
    """

    def watch() -> None:
        while os.getppid() == driver_pid:
            time.sleep(poll_s)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="driver-watch", daemon=True).start()


def _worker(args) -> int:
    if args.driver_pid:
        exit_with_driver(args.driver_pid)
    part = Path(args.part)
    try:
        run_preset(
            args.worker,
            part,
            tiny=args.tiny,
            cpu=args.cpu,
            epochs=args.epochs,
            compared=tuple(c for c in args.compared.split(",") if c),
            pipeline_steps=args.pipeline_steps,
            repeats=args.repeats,
        )
    except BaseException as err:  # noqa: BLE001 - recorded, then the worker exits non-zero
        result = json.loads(part.read_text()) if part.is_file() else {"preset": args.worker}
        result.update(status="failed", error=f"{type(err).__name__}: {err}".strip()[:2000])
        result["traceback"] = traceback.format_exc()[-4000:]
        _write_json(part, result)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------


def _in_subprocess(preset: str, part: Path, log, timeout: float, worker_args: list[str]) -> dict:
    """The worker in its own process group, killed with its children at `timeout`."""
    package_root = str(Path(__file__).resolve().parents[2])  # this checkout's ddpo_lite
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "ddpo_lite.bench.suite", "--worker", preset]
    command += ["--part", str(part), "--driver-pid", str(os.getpid()), *worker_args]
    log.write(f"\n===== {preset}: {' '.join(command)}\n")
    log.flush()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip
    code, timed_out = None, False
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:  # a timeout, or the driver itself interrupted: the worker and its children go
        if code is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result = json.loads(part.read_text()) if part.is_file() else {"preset": preset}
    if timed_out:
        result.update(
            status="timeout", error=f"killed after {timeout:.0f} s (stage {result.get('stage')})"
        )
    elif code != 0 and result.get("status") != "failed":
        result.update(status="failed", error=f"worker exited with {code} (see bench.log)")
    return result


def _in_process(preset: str, part: Path, worker_kwargs: dict) -> dict:
    try:
        return run_preset(preset, part, **worker_kwargs)
    except Exception as err:  # noqa: BLE001 - one preset's failure is recorded, the rest run
        result = json.loads(part.read_text()) if part.is_file() else {"preset": preset}
        result.update(status="failed", error=f"{type(err).__name__}: {err}".strip()[:2000])
        return result


def run_suite(
    presets: list[str],
    out: Path,
    *,
    budget_s: float = 420.0,
    preset_timeout_s: float = 240.0,
    tiny: bool = False,
    cpu: bool = False,
    epochs: int = 2,
    pipeline_steps: int = 10,
    repeats: int = 1,
    isolate: bool = True,
    min_start_s: float = MIN_START_S,
) -> dict:
    """Run `presets` (in the order given) within `budget_s`; returns what bench.json holds."""
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    suite: dict = {
        "kind": "gpu-bench",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "cpu, tiny models" if tiny else "published architectures, random weights",
        "budget_s": budget_s,
        "epochs": epochs,
        "pipeline_steps": pipeline_steps,
        "repeats": repeats,
        "presets": [],
    }
    compared: list[str] = []
    parts = Path(tempfile.mkdtemp(prefix="ddpo-bench-parts-"))
    worker_kwargs = dict(tiny=tiny, cpu=cpu, epochs=epochs, pipeline_steps=pipeline_steps,
                         repeats=repeats)  # fmt: skip
    with open(out / "bench.log", "a") as log:
        for preset in presets:
            left = budget_s - (time.monotonic() - start)
            measured = {r["preset"] for r in suite["presets"] if r.get("measurement")}
            if preset in STANDS_FOR and STANDS_FOR[preset][0] in measured:
                by, why = STANDS_FOR[preset]
                result = {"preset": preset, "status": "stood-for", "by": by,
                          "error": f"measured by {by}: {why}"}  # fmt: skip
            elif left < min_start_s:
                result = {"preset": preset, "status": "skipped",
                          "error": f"budget: {max(left, 0):.0f} s of {budget_s:.0f} s left"}  # fmt: skip
            else:
                part = parts / f"{preset.replace('/', '_')}.json"
                timeout = min(preset_timeout_s, left)
                began = time.monotonic()
                if isolate:
                    worker_args = [f"--epochs={epochs}", f"--pipeline-steps={pipeline_steps}",
                                   f"--repeats={repeats}", f"--compared={','.join(compared)}"]  # fmt: skip
                    worker_args += ["--tiny"] * tiny + ["--cpu"] * cpu
                    result = _in_subprocess(preset, part, log, timeout, worker_args)
                else:
                    result = _in_process(
                        preset, part, {**worker_kwargs, "compared": tuple(compared)}
                    )
                result["wall_seconds"] = time.monotonic() - began
                if "vs_pipeline" in result:
                    compared.append(result["family"])
            suite["presets"].append(result)
            suite["elapsed_s"] = time.monotonic() - start
            _write_json(out / "bench.json", suite)
            (out / "bench.md").write_text(markdown(suite))
    return suite


# ---------------------------------------------------------------------------------------------
# the tables
# ---------------------------------------------------------------------------------------------


def _deviation(measured: dict) -> str:
    value = measured.get("on_policy_ratio_dev")
    return "- (no ratio)" if value is None else f"{value:.1e}"


def _count(value) -> str:
    return "-" if value is None else str(value)


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f}"


def _diff(measured, estimated) -> str:
    if not measured or estimated is None:
        return "n/a"
    return f"{100 * (estimated - measured) / measured:+.0f}%"


def markdown(suite: dict) -> str:
    """The memory table (per phase) and the speed table, one row per preset that ran, and the
    presets that did not run with why."""
    memory = [
        "| preset | model | px | phase | allocated MiB | estimate MiB | diff | reserved MiB "
        "| est. reserved MiB | diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    speed = [
        "| preset | model | px | s/epoch | samples/s | on-policy max abs(ratio - 1) | "
        "rollout img/s | rollout, no log-probs img/s | pipeline img/s | pipeline s / rollout s "
        "| steps (vs pipeline) | syncs rollout / pipeline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    others = []
    compared = {r["family"]: r["preset"] for r in suite["presets"] if r.get("vs_pipeline")}
    for result in suite["presets"]:
        name = result["preset"]
        measured = result.get("measurement")
        if result.get("status") != "ok" or not measured:
            others.append(f"- {name}: {result.get('status')}: {result.get('error', '')}")
            if not measured:
                continue
        model, px = result["model"], str(result["resolution"])
        estimate = result.get("estimate", {}).get("phases", {})
        for phase in PHASES:
            got = measured["phases"][phase]
            predicted = estimate.get(phase, {}).get("peak_bytes")
            reserved = got["reserved_bytes"]
            factor = result.get("estimate_reserved_factor", 1.0)
            predicted_reserved = None if predicted is None else predicted * factor
            memory.append(
                f"| {name} | {model} | {px} | {phase} | {_mib(got['peak_bytes'])} | "
                f"{_mib(predicted)} | {_diff(got['peak_bytes'], predicted)} | {_mib(reserved)} | "
                f"{_mib(predicted_reserved)} | {_diff(reserved, predicted_reserved)} |"
            )
        versus = result.get("vs_pipeline")
        if versus:
            cells = [
                f"{versus['rollout_images_per_second']:.2f}",
                f"{versus['rollout_no_record_images_per_second']:.2f}",
                f"{versus['pipeline_images_per_second']:.2f}",
                f"{versus['ratio']:.2f}",
                str(versus["steps"]),
                " / ".join(_count(versus.get(f"{n}_syncs")) for n in ("rollout", "pipeline")),
            ]
        else:
            cells = [f"see {compared.get(result['family'], 'n/a')}"] * 4 + ["-", "-"]
        speed.append(
            f"| {name} | {model} | {px} | {measured['seconds_per_epoch']:.1f} | "
            f"{measured['samples_per_second']:.2f} | {_deviation(measured)} | "
            f"{' | '.join(cells)} |"
        )
    ran = [r["measurement"] for r in suite["presets"] if r.get("measurement")]
    source = sorted({m["peak_source"] for m in ran}) or ["n/a"]
    head = (
        f"{suite['mode']} on {ran[0]['device'] if ran else 'n/a'}, torch "
        f"{ran[0]['torch'] if ran else 'n/a'}. Each preset with its own levers, {suite['epochs']} "
        "epoch(s) of one sampling batch and one optimizer step (the first epoch burn-in when "
        f"there are more); peaks by {', '.join(source)}; diff = (estimate - measured) / "
        "measured; the estimate for the same cut config. Rollout vs the family's diffusers "
        f"pipeline on the first preset of each family, at min(preset's steps, "
        f"{suite['pipeline_steps']}) steps, {suite['repeats']} timed round(s) after the epochs."
    )
    notes = sorted({f"- {r['preset']}: {n}" for r in suite["presets"] for n in _notes(r)})
    stood = [f"- {r['preset']}: {r['error']}" for r in suite["presets"] if r.get("by")]
    others = [line for line in others if line not in stood and ": stood-for: " not in line]
    parts = [head, "", *memory, "", *speed]
    outside = {m["preset"]: m["outside_allocator_bytes"] for m in ran}
    if any(v is not None for v in outside.values()):
        from ddpo_lite.bench.estimate import ALLOCATOR_OVERHEAD, CUDA_CONTEXT_BYTES

        cells = ", ".join(f"{k} {_mib(v)}" for k, v in outside.items() if v is not None)
        ratios = sorted(
            p["reserved_bytes"] / p["peak_bytes"]
            for m in ran
            for p in m["phases"].values()
            if p.get("reserved_bytes") and p.get("peak_bytes")
        )
        spread = (
            f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f}, "
            f"{len(ratios)} phases)"
            if ratios
            else "n/a"
        )
        parts += [
            "",
            f"On the card beyond PyTorch's allocator (CUDA context, kernels), MiB, after the "
            f"epochs: {cells}; the estimate assumes {_mib(CUDA_CONTEXT_BYTES)}. Reserved / "
            f"allocated peak, measured: {spread}; the estimate assumes "
            f"{1 + ALLOCATOR_OVERHEAD:.2f}.",
        ]
    if stood:
        parts += ["", "Measured by another preset:", *stood]
    if others:
        parts += ["", "Not run or not finished:", *others]
    if notes:
        parts += ["", "Notes:", *notes]
    return "\n".join(parts) + "\n"


def _notes(result: dict) -> list[str]:
    notes = list(result.get("notes", []))
    notes += result.get("measurement", {}).get("notes", [])
    return notes


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddpo_lite.bench.suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--presets", help="comma-separated, in order (default: every GPU preset)")
    parser.add_argument(
        "--out", default="bench_out", help="folder for bench.json, bench.md, bench.log"
    )
    parser.add_argument("--budget-s", type=float, default=420.0, help="all presets (default 420)")
    parser.add_argument(
        "--preset-timeout-s", type=float, default=240.0, help="one preset (default 240)"
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny models instead of *-random")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (memory.cpu)")
    parser.add_argument(
        "--epochs", type=int, default=2, help="per preset, the first burn-in (default 2)"
    )
    parser.add_argument("--pipeline-steps", type=int, default=10,
                        help="cap on the steps of the pipeline comparison (default 10)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds of the comparison")
    parser.add_argument("--in-process", action="store_true", help="no subprocess per preset")
    parser.add_argument("--min-start-s", type=float, default=MIN_START_S, help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--driver-pid", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--compared", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    presets = args.presets.split(",") if args.presets else list(GPU_PRESETS)
    suite = run_suite(
        presets,
        Path(args.out),
        budget_s=args.budget_s,
        preset_timeout_s=args.preset_timeout_s,
        tiny=args.tiny,
        cpu=args.cpu,
        epochs=args.epochs,
        pipeline_steps=args.pipeline_steps,
        repeats=args.repeats,
        isolate=not args.in_process,
        min_start_s=args.min_start_s,
    )
    print(markdown(suite))
    return 0


if __name__ == "__main__":
    sys.exit(main())
