"""scripts/gpu_bench.sh's driver (ddpo_lite/bench/suite.py) on the tiny models on the CPU, so
that the one GPU run does not fail on a typo: one preset per family in process (every column of
the JSON and the tables filled), then the subprocess isolation and the budget (a bogus preset
fails alone, a preset that outlives the budget is killed, the rest is skipped, all recorded)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddpo_lite.bench.suite import GPU_PRESETS, markdown, run_suite

ONE_PER_FAMILY = [
    "aesthetic",
    "sdxl-aesthetic",
    "sd35-pickscore",
    "flux-pickscore",
    "flux2-pickscore",
]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run_suite(ONE_PER_FAMILY, out, tiny=True, cpu=True, epochs=1, isolate=False)
    return result, out


@pytest.mark.xdist_group("gpu_bench_suite")  # one worker builds the module fixture
def test_every_family_measured_beside_its_estimate_and_pipeline(suite):
    result, out = suite
    assert json.loads((out / "bench.json").read_text()) == json.loads(
        json.dumps(result, default=str)
    )
    by_name = {r["preset"]: r for r in result["presets"]}
    assert list(by_name) == ONE_PER_FAMILY
    assert {r["family"] for r in by_name.values()} == {"sd1", "sdxl", "sd3", "flux", "flux2"}
    for name, r in by_name.items():
        assert r["status"] == "ok", (name, r.get("error"), r.get("traceback"))
        measured, estimated = r["measurement"], r["estimate"]
        for phase in ("sampling", "reward", "training"):
            assert measured["phases"][phase]["peak_bytes"] > 0
            assert estimated["phases"][phase]["peak_bytes"] > 0
            # like for like: the same reduced config on both sides; the tiny models' counted
            # peaks are within 25% of the estimate (30-50% off would be a different config)
            ratio = (
                estimated["phases"][phase]["peak_bytes"] / measured["phases"][phase]["peak_bytes"]
            )
            assert 0.75 < ratio < 1.33, (name, phase, ratio)
        versus = r["vs_pipeline"]
        assert versus["family"] == r["family"]
        for key in ("rollout", "rollout_no_record", "pipeline"):
            assert versus[f"{key}_images_per_second"] > 0
        assert measured["seconds_per_epoch"] > 0 and measured["samples_per_second"] > 0
        # the text tokens the run encoded with: -1 (CLIP only) for the UNet families
        assert (measured["text_tokens"] == -1) == (r["family"] in ("sd1", "sdxl"))
        # every one of these presets has a PPO ratio; on-policy it is 1 within float error
        assert 0 <= measured["on_policy_ratio_dev"] < 1e-4, (name, measured["on_policy_ratio_dev"])
    assert any("needs CUDA" in n for n in by_name["flux-pickscore"]["notes"])  # nf4 on a CPU


@pytest.mark.xdist_group("gpu_bench_suite")  # one worker builds the module fixture
def test_markdown_tables_have_every_cell_filled(suite):
    result, out = suite
    text = (out / "bench.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    memory = [r for r in rows if r.split("|")[4].strip() in ("sampling", "reward", "training")]
    speed = [r for r in rows if r not in memory and not r.startswith("| preset")]
    assert len(memory) == 3 * len(ONE_PER_FAMILY) and len(speed) == len(ONE_PER_FAMILY)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(cells), row
    assert "Not run" not in text
    standing = {
        "preset": "counting",
        "status": "stood-for",
        "by": "aesthetic",
        "error": "measured by aesthetic: why",
    }
    text = markdown({**result, "presets": [*result["presets"], standing]})
    assert "Measured by another preset:\n- counting: measured by aesthetic: why" in text
    assert "Not run" not in text
    assert "beyond PyTorch's allocator" not in text  # a CPU run has none to tell
    on_card = copy.deepcopy(result)
    measured = on_card["presets"][0]["measurement"]
    measured["outside_allocator_bytes"] = 600 * 2**20
    for phase, ratio in zip(measured["phases"].values(), (1.2, 1.05, 1.5), strict=True):
        phase["reserved_bytes"] = int(phase["peak_bytes"] * ratio)
    text = markdown(on_card)
    assert "beyond PyTorch's allocator (CUDA context, kernels), MiB, after the epochs: " in text
    assert f"{ONE_PER_FAMILY[0]} 600;" in text and "the estimate assumes 512" in text
    assert "Reserved / allocated peak, measured: 1.20 (1.05-1.50, 3 phases)" in text


def test_failures_are_isolated_and_the_budget_is_kept(tmp_path):
    """scripts/gpu_bench.sh as the GPU runs it, on the tiny models: a bogus preset fails alone; the next starts in its own process and is killed when the
    budget runs out (1000 epochs); the rest is skipped, and the stand-in is not taken for a
    preset that was never measured."""
    budget = 4.0
    presets = ["no-such-preset", "aesthetic", "compressibility", "incompressibility"]
    start = time.monotonic()
    subprocess.run(
        ["bash", "scripts/gpu_bench.sh", "--cpu", "--tiny", "--presets", ",".join(presets),
         "--budget-s", str(budget), "--min-start-s", "1", "--epochs", "1000"],
        cwd=ROOT, check=True, capture_output=True, timeout=60,
        env={**os.environ, "OUT": str(tmp_path)},
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert elapsed < budget + 10  # + the script's own start (torch imported once)
    result = json.loads((tmp_path / "bench.json").read_text())
    status = {r["preset"]: r for r in result["presets"]}
    assert status["no-such-preset"]["status"] == "failed"
    assert "unknown preset 'no-such-preset'" in status["no-such-preset"]["error"]
    assert status["aesthetic"]["status"] == "timeout"
    # the worker ran (no typo on its command line) and would have run 1000 epochs
    assert status["aesthetic"]["stage"] in ("setup", "estimate", "measure")
    assert status["compressibility"]["status"] == "skipped"
    assert status["incompressibility"]["status"] == "skipped"
    text = (tmp_path / "bench.md").read_text()
    assert "no-such-preset: failed" in text and "aesthetic: timeout" in text


def test_the_default_order_covers_every_gpu_preset():
    presets = {p.stem for p in (ROOT / "presets").glob("*.toml")}
    gpu = {p for p in presets if p != "tiny" and not p.startswith("shapes")}
    assert set(GPU_PRESETS) == gpu and len(GPU_PRESETS) == len(gpu)


@pytest.mark.parametrize(
    "preset", ["aesthetic", "sdxl-pickscore", "sd35-ocr", "flux-pickscore", "flux2-pickscore"]
)
def test_gpu_configs_build_their_random_models_and_rewards_on_meta(preset, tmp_path):
    """What the GPU run builds, on the meta device (no memory, no arithmetic): the preset as the
    suite cuts it, its published architecture and its reward's stand-in."""
    import torch

    from ddpo_lite.bench.bench import build_bench_reward, build_pipeline
    from ddpo_lite.bench.suite import RANDOM_MODELS, bench_config

    config, family, notes = bench_config(preset, tiny=False, cpu=False, output_dir=str(tmp_path))
    assert config.model.name == RANDOM_MODELS[family]
    assert config.sample.num_batches_per_epoch == 1
    assert config.train.gradient_accumulation * config.train.batch_size >= config.sample.batch_size
    config.memory.offload_reward = False  # meta tensors cannot visit the CPU
    config.memory.quantize_base = {"nf4": "none"}.get(
        config.memory.quantize_base, config.memory.quantize_base
    )
    pipe = build_pipeline(config, None, "meta")
    assert type(pipe).__name__.endswith("Pipeline")
    reward, reward_notes = build_bench_reward(config, torch.device("meta"))
    if "pickscore" in preset:
        assert "ViT-H/14 pair" in reward_notes[0] and len(reward.models) == 2
    if family in ("sd3", "flux", "flux2"):
        assert any("encoded on the GPU" in n for n in notes)


def test_quantize_denoiser_swaps_in_the_reloaded_model(monkeypatch):
    """The save + reload around diffusers' quantizer (a GPU's bitsandbytes), with no quantizer:
    the pipeline's denoiser is the reloaded one, with the same weights."""
    import torch

    from ddpo_lite.bench.bench import quantize_denoiser
    from ddpo_lite.config import MemoryConfig
    from ddpo_lite.models import load_pipeline, loading

    monkeypatch.setattr(
        loading,
        "load_options",
        lambda memory: {loading.QUANTIZE_DENOISER: None, "torch_dtype": torch.float32},
    )
    pipe = load_pipeline("tiny-flux")
    before = pipe.transformer
    quantize_denoiser(pipe, MemoryConfig(quantize_base="nf4"))
    assert pipe.transformer is not before and pipe.components["transformer"] is pipe.transformer
    after = pipe.transformer.state_dict()
    assert list(after) == list(before.state_dict())
    for name, weight in before.state_dict().items():
        torch.testing.assert_close(after[name], weight, msg=name)


def _bench_run(preset: str, tmp_path, **memory):
    """The GPU run's `Run` for `preset` on its tiny model, with the GPU's levers (no --cpu),
    `memory` fields replaced."""
    from ddpo_lite.bench.bench import Run
    from ddpo_lite.bench.suite import bench_config

    config, _, _ = bench_config(preset, tiny=True, cpu=False, output_dir=str(tmp_path))
    for name, value in memory.items():
        setattr(config.memory, name, value)
    return config, Run(config, None)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_bitsandbytes_base_trains_its_lora_as_on_a_gpu(kind, monkeypatch, tmp_path):
    """memory.quantize_base 'nf4' / 'int8' as only a GPU runs it: diffusers' bitsandbytes
    quantizer on the reloaded denoiser (quantize_denoiser), its weights left uncast, peft's
    4-/8-bit LoRA layers, accelerate's checks for a quantized model, 8-bit Adam, gradient
    checkpointing, an epoch and the pipeline beside it. On the CPU, with diffusers' GPU check
    and device map bypassed (bitsandbytes itself quantizes on the CPU)."""
    import torch

    bnb = pytest.importorskip("bitsandbytes")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU: the suite runs this path itself")
    from diffusers.quantizers.bitsandbytes import bnb_quantizer
    from peft.tuners.lora import bnb as peft_bnb

    from ddpo_lite.bench.bench import measure, vs_pipeline
    from ddpo_lite.models import loading

    monkeypatch.setattr(loading, "check_bitsandbytes", lambda kind: None)
    for quantizer in (
        bnb_quantizer.BnB4BitDiffusersQuantizer,
        bnb_quantizer.BnB8BitDiffusersQuantizer,
    ):
        monkeypatch.setattr(quantizer, "validate_environment", lambda self, *a, **k: None)
        monkeypatch.setattr(quantizer, "update_device_map", lambda self, device_map: {"": "cpu"})
    # the CPU's packed 4-bit inference kernel (no GPU has it) wants wider layers than the tiny's
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)
    monkeypatch.setenv("DDPO_LITE_BENCH_TMP", str(tmp_path))
    config, run = _bench_run("flux-pickscore", tmp_path, quantize_base=kind)  # the preset: nf4
    layer = bnb.nn.Linear4bit if kind == "nf4" else bnb.nn.Linear8bitLt
    lora = peft_bnb.Linear4bit if kind == "nf4" else peft_bnb.Linear8bitLt
    assert any(isinstance(m, layer) for m in run.denoiser.modules())
    assert any(isinstance(m, lora) for m in run.denoiser.modules())
    assert run.optimizer_name == "AdamW8bit"
    assert {p.dtype for p in run.params} == {torch.float32}
    before = [p.detach().clone() for p in run.params]
    result = measure(config, 1, run=run)
    assert result["on_policy_ratio_dev"] is not None
    assert any(not torch.equal(a, p) for a, p in zip(before, run.params, strict=True))
    versus = vs_pipeline(config, None, 1, run=run, steps=2, burn_in=False)
    assert versus["pipeline"] == "FluxPipeline" and versus["ratio"] > 0


def test_fp16_presets_train_through_the_grad_scaler(monkeypatch, tmp_path):
    """mixed_precision = 'fp16' as only a GPU runs it: accelerate's GradScaler scales the
    backward, unscales in clip_grad_norm_ and steps 8-bit Adam; SDXL's VAE stays float32. On the
    CPU: the accelerator's precision set to fp16 and a CPU GradScaler given to it."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    import ddpo_lite.trainer as trainer
    from ddpo_lite.bench.bench import measure

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU: the suite runs this path itself")

    def fp16_accelerator(config):
        AcceleratorState._reset_state(reset_partial_state=False)
        accelerator = Accelerator(mixed_precision="bf16", cpu=True)  # native autocast on
        accelerator.state._mixed_precision = "fp16"  # as on a GPU: fp16 autocast, a scaler
        accelerator.scaler = torch.amp.GradScaler("cpu")
        return accelerator

    monkeypatch.setattr(trainer, "make_accelerator", fp16_accelerator)
    config, run = _bench_run("sdxl-aesthetic", tmp_path)
    assert config.memory.mixed_precision == "fp16"
    assert run.optimizer.scaler is run.accelerator.scaler
    assert run.pipe.vae.dtype == torch.float32 and run.denoiser.dtype == torch.float16
    before = [p.detach().clone() for p in run.params]
    measure(config, 1, run=run)
    assert any(not torch.equal(a, p) for a, p in zip(before, run.params, strict=True))


def test_a_quantized_preset_is_skipped_with_the_reason_where_bitsandbytes_cannot_run(tmp_path):
    import torch

    from ddpo_lite.bench.suite import run_preset

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU: the NF4 preset would run")
    result = run_preset("flux-pickscore", tmp_path / "part.json", tiny=True)
    assert result["status"] == "skipped" and "quantize_base = 'nf4'" in result["error"]
    assert json.loads((tmp_path / "part.json").read_text())["status"] == "skipped"


def test_syncs_are_counted_as_cuda_reports_them(monkeypatch):
    """The GPU run's sync count (CUDA's sync debug mode, which a CPU build lacks): the mode is
    set around the call and restored, each warning CUDA gives is one sync, others are not."""
    import warnings

    import torch

    from ddpo_lite.bench.bench import count_syncs

    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def two_syncs():
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        warnings.warn("an unrelated warning", stacklevel=1)
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)

    assert count_syncs(torch.device("cuda"), two_syncs) == 2
    assert modes == ["warn", 0]
    assert count_syncs(torch.device("cpu"), two_syncs) is None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is left


def test_a_worker_and_its_children_go_when_the_driver_is_killed():
    """A driver killed with SIGKILL cannot kill its workers (each in its own session): the
    worker watches for it and takes its process group (here a `sleep` child) with it."""
    worker = (
        "import subprocess, sys, time; from ddpo_lite.bench.suite import exit_with_driver; "
        "child = subprocess.Popen(['sleep', '60']); print(child.pid, flush=True); "
        "exit_with_driver(int(sys.argv[1]), poll_s=0.05); time.sleep(60)"
    )
    driver = (
        "import os, subprocess, sys, time; "
        f"w = subprocess.Popen([sys.executable, '-c', {worker!r}, str(os.getpid())], "
        "start_new_session=True, stdout=subprocess.PIPE, text=True); "
        "print(w.pid, w.stdout.readline().strip(), flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True, env=env
    )
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    time.sleep(0.3)
    assert all(_alive(p) for p in pids)  # the driver alive: the worker stays
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if _alive(p)]
    for pid in left:  # a failure leaves nothing running
        os.kill(pid, signal.SIGKILL)
    assert not left
