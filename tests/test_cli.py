"""The command line, end to end on the tiny model: what the README tells a user to run, and
every user mistake answered with one line and exit status 2."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from rich.progress import Progress

from ddpo_lite import __version__
from ddpo_lite.cli import main
from ddpo_lite.config import list_presets, load_config
from ddpo_lite.models.lora import read_lora_metadata
from ddpo_lite.models.tiny import tiny_pipeline_dir

SHORT = ["num_epochs=2", "sample.num_steps=3", "sample.num_batches_per_epoch=1"]


def _args(*sets: str) -> list[str]:
    out = []
    for item in sets:
        out += ["--set", item]
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One `ddpo-lite train` run from the command line, shared by the tests below."""
    out = tmp_path_factory.mktemp("cli") / "run"
    argv = ["train", "--preset", "tiny", *_args(*SHORT), "--output", str(out), "--quiet"]
    assert main([*argv, "--export", "kohya"]) == 0
    return out


def test_train_leaves_a_complete_run(run_dir, capsys):
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    for key in ("reward_mean", "reward_std", "reward_min", "reward_max", "approx_kl", "clipfrac"):
        assert key in rows[0]
    for key in ("loss", "grad_norm", "epoch_seconds", "samples_per_second", "peak_memory_bytes"):
        assert key in rows[0]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "epoch_0001.png",
        "epoch_0002.png",
    ]
    # the resolved config loads back as it was
    config = load_config(str(run_dir / "config.toml"))
    assert config.num_epochs == 2 and config.sample.num_steps == 3
    # TensorBoard through accelerate's tracker
    assert list((run_dir / "logs").rglob("events.out.tfevents.*"))
    card = (run_dir / "README.md").read_text()
    assert "load_lora_weights" in card and "ddpo-lite export" in card
    meta = read_lora_metadata(run_dir / "lora")
    assert meta["base_model"] == "tiny:0" and meta["rank"] == "4" and meta["preset"] == "tiny"
    assert meta["version"] == __version__ and meta["epoch"] == "2"


def test_sample_matches_plain_diffusers_and_differs_from_base(run_dir, tmp_path):
    out = tmp_path / "images"
    code = main(
        [
            "sample",
            "--lora",
            str(run_dir / "lora"),
            "--prompt",
            "a cat",
            "--prompt",
            "a dog",
            "--num",
            "2",
            "--seed",
            "7",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    files = sorted(p.name for p in out.glob("*.png"))
    assert "grid.png" in files and len(files) == 5
    ours = np.asarray(Image.open(sorted(out.glob("000_01_*.png"))[0]))

    # what a user writes with diffusers alone: image 1 of "a cat" is seed 7 + 1
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_pipeline_dir(0), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

    def draw():
        return np.asarray(
            pipe(
                "a cat",
                num_inference_steps=3,
                guidance_scale=5.0,
                eta=1.0,
                generator=torch.Generator().manual_seed(8),
            ).images[0]
        )

    base = draw()
    pipe.load_lora_weights(run_dir / "lora")
    tuned = draw()
    assert np.abs(tuned.astype(int) - ours.astype(int)).max() <= 1  # PNG of the same floats
    assert np.abs(tuned.astype(int) - base.astype(int)).sum() > 0


def _one_image(out: Path, *args: str) -> np.ndarray:
    """`ddpo-lite sample ARGS` of one image of "a cat" into `out`, read back as integers."""
    assert main(["sample", *args, "--prompt", "a cat", "--num", "1", "--output", str(out)]) == 0
    return np.asarray(Image.open(next(out.glob("000_00_*.png")))).astype(int)


def test_sample_scale_sets_the_loras_strength(run_dir, tmp_path, capsys):
    """--scale 0 draws the base model's image, 0.5 one between it and the trained one (1, the
    default) (diffusers' set_adapters: the LoRA's change times the strength); a scale without
    a LoRA, or not a number, is one line."""
    lora = ("--lora", str(run_dir / "lora"))
    base = _one_image(tmp_path / "base", "--model", "tiny:0", "--steps", "3")  # as trained
    trained = _one_image(tmp_path / "trained", *lora)
    zero, half = (_one_image(tmp_path / f"scale-{s}", *lora, "--scale", s) for s in ("0", "0.5"))
    np.testing.assert_array_equal(zero, base)
    change = np.abs(trained - base).sum()
    assert change > 0
    assert 0 < np.abs(half - base).sum() < change and 0 < np.abs(half - trained).sum() < change
    capsys.readouterr()
    assert main(["sample", "--model", "tiny:0", "--prompt", "a cat", "--scale", "0.5"]) == 2
    assert "--scale sets a LoRA's strength: give --lora PATH" in capsys.readouterr().err
    assert main(["sample", *lora, "--prompt", "a cat", "--scale", "nan"]) == 2
    assert "--scale nan is invalid" in capsys.readouterr().err


def test_sample_and_eval_default_to_the_gpu_in_half_precision(run_dir, tmp_path, monkeypatch):
    """`sample` / `eval` without --device take the GPU where there is one, in bf16 (fp16 on a
    card without bf16), fp32 on the CPU; --dtype bf16 runs on the CPU too (eval under autocast),
    and its images are the fp32 ones to bf16's precision."""
    from ddpo_lite.sample import inference_device, inference_dtype

    assert inference_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert inference_device(None) == "cuda" and inference_dtype("auto", "cuda") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert inference_dtype("auto", "cuda:1") == torch.bfloat16
    assert inference_dtype("auto", "cpu") == torch.float32
    assert inference_dtype("fp16", "cpu") == torch.float16
    monkeypatch.undo()

    lora = ["--lora", str(run_dir / "lora")]
    fp32, bf16 = (_one_image(tmp_path / d, *lora, "--dtype", d) for d in ("fp32", "bf16"))
    assert 0 < np.abs(bf16 - fp32).mean() < 8  # bf16 applied, and close

    prompts = tmp_path / "animals.txt"
    prompts.write_text("a cat\na dog\n")
    args = ["eval", "--lora", str(run_dir / "lora"), "--prompts", str(prompts), "--num", "1"]
    assert main([*args, "--dtype", "bf16"]) == 0


def test_sample_quantizes_the_frozen_denoiser_as_training_does(run_dir, tmp_path, capsys):
    """--quantize fp8 stores the denoiser's frozen weights in float8 (the LoRA kept in the compute
    dtype): images close to the fp32 ones, not equal; nf4 needs a GPU: one line here."""
    for source in (["--lora", str(run_dir / "lora")], ["--model", "tiny", "--steps", "3"]):
        name = source[0][2:]  # a LoRA, and the base alone
        none, fp8 = (
            _one_image(tmp_path / f"{name}-{q}", *source, "--quantize", q) for q in ("none", "fp8")
        )
        assert 0 < np.abs(fp8 - none).mean() < 8
    # eval (its own rollout) on the fp8 base
    prompts = tmp_path / "animals.txt"
    prompts.write_text("a cat\n")
    args = ["eval", "--lora", str(run_dir / "lora"), "--prompts", str(prompts), "--num", "1"]
    assert main([*args, "--quantize", "fp8"]) == 0
    capsys.readouterr()
    args = ["sample", "--lora", str(run_dir / "lora"), "--prompt", "a cat", "--quantize", "nf4"]
    assert main([*args, "--output", str(tmp_path / "nf4")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nf4" in err and "Traceback" not in err


def test_sample_loads_the_base_quantized_as_trained_where_it_can(run_dir, tmp_path):
    """The LoRA records its run's memory.quantize_base; `sample` without --quantize loads the
    base the same way on a GPU, and unquantized on the CPU (NF4 / int8 need a GPU)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ddpo_lite.models.lora import LORA_WEIGHT_NAME
    from ddpo_lite.sample import trained_quantization

    assert read_lora_metadata(run_dir / "lora")["quantize_base"] == "none"
    with safe_open(run_dir / "lora" / LORA_WEIGHT_NAME, framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        header = dict(f.metadata())
    header["ddpo_lite.quantize_base"] = "nf4"
    save_file(tensors, tmp_path / "nf4.safetensors", metadata=header)
    assert trained_quantization(tmp_path / "nf4.safetensors", "cuda:0") == "nf4"
    assert trained_quantization(tmp_path / "nf4.safetensors", "cpu") == "none"
    assert trained_quantization(run_dir / "lora", "cuda") == "none"


def test_offload_keeps_models_off_the_gpu_but_while_they_run(
    run_dir, tmp_path, capsys, monkeypatch
):
    """--offload: `sample` through diffusers' model CPU offload (same images, every model behind
    an accelerate hook), `eval` with the text encoders kept off the device (same scores); without
    the flag, offload only where the weights to move exceed the GPU's free memory / 1.25."""
    import ddpo_lite.sample
    from ddpo_lite.evaluate import place_for_eval
    from ddpo_lite.models import load_pipeline
    from ddpo_lite.sample import OFFLOAD_MARGIN, offload_needed, place, weight_bytes_to_move

    placed = []

    def spy(pipe, device, offload):
        placed.append(pipe)
        return place(pipe, device, offload)

    monkeypatch.setattr(ddpo_lite.sample, "place", spy)
    lora = ["--lora", str(run_dir / "lora")]
    resident, offloaded = (
        _one_image(tmp_path / f, *lora, f) for f in ("--no-offload", "--offload")
    )
    assert np.array_equal(resident, offloaded)
    assert not hasattr(placed[0].unet, "_hf_hook")
    assert all(hasattr(getattr(placed[1], n), "_hf_hook") for n in ("text_encoder", "unet", "vae"))

    prompts = tmp_path / "animals.txt"
    prompts.write_text("a cat\n")
    args = ["eval", *lora, "--prompts", str(prompts), "--num", "1"]
    tables, _ = [], capsys.readouterr()
    for flag in ("--no-offload", "--offload"):
        assert main([*args, flag]) == 0
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1] and "animals" in tables[0]
    pipe = load_pipeline("tiny:0")
    place_for_eval(pipe, "meta", offload=True)  # a second device kind, without a GPU
    assert pipe.text_encoder.device.type == "cpu"
    assert pipe.unet.device.type == "meta" and pipe.vae.device.type == "meta"

    pipe = load_pipeline("tiny:0")
    weights = weight_bytes_to_move(pipe, "cuda")
    parts = (pipe.unet, pipe.vae, pipe.text_encoder)
    saved = sum(sum(t.nbytes for t in m.state_dict().values()) for m in parts)
    assert saved <= weights < saved * 1.001  # and buffers not saved (CLIP's position ids)
    assert weight_bytes_to_move(pipe, "cpu") == 0 and not offload_needed(pipe, "cpu", None)
    for free, expected in ((weights * OFFLOAD_MARGIN * 0.99, True), (weights * 2, False)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free: (int(f), 2**40))
        assert offload_needed(pipe, "cuda", None) is expected
        assert offload_needed(pipe, "cuda", not expected) is not expected  # as asked
    assert "do not all fit" in capsys.readouterr().err


def test_sample_keeps_the_images_made_before_it_stopped(run_dir, tmp_path, capsys, monkeypatch):
    """Each prompt's images are written once made: Ctrl-C (or a crash) at the second prompt
    leaves the first one's, says where, and shows one bar over the prompts (not diffusers')."""
    import ddpo_lite.trainer

    calls, bars = [], []
    original = StableDiffusionPipeline.__call__

    def stopped_at_the_second(self, *args, **kwargs):
        calls.append(kwargs["prompt"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    def progress_bars(console, enabled):
        bars.append(Progress(console=console, disable=True))
        return bars[-1]

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", stopped_at_the_second)
    monkeypatch.setattr(ddpo_lite.trainer, "progress_bars", progress_bars)
    out = tmp_path / "shots"
    args = ["sample", "--lora", str(run_dir / "lora"), "--prompt", "a cat", "--prompt", "a dog"]
    assert main([*args, "--num", "2", "--steps", "3", "--output", str(out)]) == 130
    assert sorted(p.name for p in out.iterdir()) == ["000_00_a-cat.png", "000_01_a-cat.png"]
    assert f"the images made so far are in {out}" in capsys.readouterr().err
    task = bars[0].tasks[0]
    assert (task.description, task.completed, task.total) == ("sampling", 1, 2)


def test_sample_resolution_is_the_trained_one_unless_asked(run_dir, tmp_path, capsys):
    trained = int(read_lora_metadata(run_dir / "lora")["resolution"])
    lora = ["--lora", str(run_dir / "lora")]
    assert _one_image(tmp_path / "as-trained", *lora).shape == (trained, trained, 3)
    assert _one_image(tmp_path / "48", *lora, "--resolution", "48").shape == (48, 48, 3)
    capsys.readouterr()
    assert main(["sample", *lora, "--prompt", "a cat", "--resolution", "50"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a multiple of 8" in err and "use e.g. 48" in err


def test_train_warns_before_loading_where_the_estimate_exceeds_the_card(
    tmp_path, capsys, monkeypatch
):
    """On a GPU without --vram, the estimate is held to the card's memory before the models
    load: a warning line naming the --vram to pass (85% of the card), and the run goes on."""
    import ddpo_lite.trainer
    from ddpo_lite.bench import over_card_warning

    config = load_config("tiny", ["memory.cpu=false"])
    assert over_card_warning(config, 2**40) is None
    assert "--vram 1`" in over_card_warning(config, 2**20)  # a 1 MiB card
    started = []

    def train(*args, **kwargs):
        started.append(True)
        raise KeyboardInterrupt  # stop where the models would load

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    card = type("Properties", (), {"total_memory": 2**20})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: card)
    monkeypatch.setattr(ddpo_lite.trainer, "train", train)
    args = ["train", "--preset", "tiny", "--set", "memory.cpu=false", "--output", str(tmp_path)]
    assert main(args) == 130 and started
    err = capsys.readouterr().err
    assert "warning:" in err and "predicted to need" in err and "--vram 1" in err
    assert main([*args, "--set", "memory.cpu=true"]) == 130  # on the CPU: nothing to check
    assert "predicted" not in capsys.readouterr().err


def test_sample_out_of_memory_is_one_line_with_what_to_do(run_dir, tmp_path, capsys, monkeypatch):
    import ddpo_lite.sample

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore")

    monkeypatch.setattr(ddpo_lite.sample, "load_with_lora", out_of_memory)
    args = ["sample", "--lora", str(run_dir / "lora"), "--prompt", "a cat"]
    assert main([*args, "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Tried to allocate 20.00 GiB" in err
    assert "--quantize nf4" in err and "--num" in err and "--offload" in err


def test_resume_from_the_command_line_extends_a_run(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main(["train", "--resume", str(copy), "--set", "num_epochs=3", "--quiet"]) == 0
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    printed = capsys.readouterr().out
    assert "from epoch 2" in printed
    # what the resume changed is said, and kept in config.toml (a comment TOML ignores)
    assert "resumed with changed settings: num_epochs 2 -> 3" in printed
    header = (copy / "config.toml").read_text().splitlines()[0]
    assert header == "# resumed at epoch 2 with num_epochs 2 -> 3"
    assert tomllib.loads((copy / "config.toml").read_text())["num_epochs"] == 3
    # not a terminal: no progress bars, one plain summary line per epoch
    summary = [line for line in printed.splitlines() if line.startswith("epoch 3/3")]
    assert len(summary) == 1 and "reward" in summary[0] and "s/epoch" in summary[0]


def test_kohya_export_from_train_and_from_the_export_command(run_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    exported = load_file(run_dir / "lora_kohya.safetensors")
    assert exported and all(key.startswith("lora_unet_") for key in exported)
    target = tmp_path / "mine.safetensors"
    assert main(["export", str(run_dir / "lora"), "--output", str(target)]) == 0
    again = load_file(target)
    assert again.keys() == exported.keys()
    for key in again:
        torch.testing.assert_close(again[key], exported[key])


def test_presets_list_show_and_version(capsys):
    assert main(["presets"]) == 0
    listed = capsys.readouterr().out
    for name in ("tiny", "aesthetic", "compressibility", "incompressibility", "prompt-alignment"):
        assert name in listed
    assert main(["presets", "show", "aesthetic"]) == 0
    shown = tomllib.loads(capsys.readouterr().out)
    assert shown["train"]["learning_rate"] == 3e-4 and shown["reward"]["name"] == "aesthetic"
    assert main(["rewards"]) == 0
    listed = capsys.readouterr().out
    for name in ("aesthetic", "prompt_alignment", "jpeg_compressibility", "pickscore", "hps"):
        assert name in listed
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize(
    "command",
    [[], ["train"], ["sample"], ["export"], ["presets"], ["eval"], ["serve-reward"], ["bench"]],
)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: ddpo-lite" in capsys.readouterr().out


def test_paper_presets_hold_the_paper_settings():
    for name in ("aesthetic", "compressibility", "incompressibility", "prompt-alignment"):
        config = load_config(name)
        assert config.model.name == "CompVis/stable-diffusion-v1-4"
        assert (config.sample.num_steps, config.sample.eta, config.sample.guidance_scale) == (
            50,
            1.0,
            5.0,
        )
        assert config.train.learning_rate == 3e-4 and config.train.clip_range == 1e-4
        assert config.train.adv_clip_max == 5 and config.lora.rank == 4
        jpeg = name.endswith("compressibility")
        assert (config.advantages.buffer_size, config.advantages.min_count) == (
            (16, 16) if jpeg else (32, 16)
        )
        lines = [
            line
            for line in Path(config.prompts.file).read_text().splitlines()
            if line and not line.startswith("#")
        ]
        assert len(lines) == (135 if name == "prompt-alignment" else 45)
        assert all(line.startswith(("a ", "an ")) for line in lines)
    assert "tiny" in list_presets()


def _one_line_error(capsys, argv, *expected):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


def test_bad_input_is_one_line(tmp_path, capsys, run_dir):
    out = ["--output", str(tmp_path / "x")]
    _one_line_error(capsys, ["train", "--preset", "nope"], "unknown preset 'nope'", "tiny")
    _one_line_error(
        capsys,
        ["train", "--preset", "tiny", *_args("train.learning_rate=fast"), *out],
        "train.learning_rate",
        "expected float",
    )
    _one_line_error(
        capsys,
        ["train", "--preset", "tiny", *_args("train.learnin_rate=1e-3"), *out],
        "unknown config key 'train.learnin_rate'",
        "did you mean 'train.learning_rate'",
    )
    _one_line_error(capsys, ["train", "--preset", "tiny", *_args("num_epochs"), *out], "key.sub")
    _one_line_error(
        capsys,
        ["train", "--preset", "tiny", *_args("reward.name='nope'"), *out],
        "unknown reward 'nope'",
        "jpeg_compressibility",
    )
    _one_line_error(
        capsys,
        ["train", "--preset", "tiny", "--output", str(run_dir)],
        "already holds a run",
        "--resume",
        "--overwrite",
    )
    _one_line_error(
        capsys,
        ["train", "--preset", "tiny", *_args("model.name='nobody/no-such-model'"), *out],
        "nobody/no-such-model",
        "tiny",
    )
    _one_line_error(
        capsys,
        ["sample", "--lora", str(tmp_path / "missing"), "--prompt", "a cat"],
        "does not exist",
        "missing",
    )
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(os.urandom(256))
    _one_line_error(
        capsys,
        ["sample", "--lora", str(corrupt), "--prompt", "a cat"],
        "corrupt.safetensors",
        "not a readable safetensors file",
    )
    _one_line_error(capsys, ["sample", "--lora", str(run_dir / "lora")], "--prompt")
    _one_line_error(capsys, ["train", "--resume", str(tmp_path)], "not a ddpo-lite run")


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel `pip install .` builds, from a clean copy of the sources (no stale build/), with
    this interpreter's setuptools and nothing downloaded."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        setuptools = version("setuptools")
    except PackageNotFoundError:
        setuptools = "none"
    if setuptools == "none" or int(setuptools.split(".")[0]) < 77:
        pytest.skip(
            f"this environment's setuptools ({setuptools}) cannot build the wheel without a "
            "download: pip install 'setuptools>=77' (in the `test` extra)"
        )
    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (repo / name).is_file():
            shutil.copy(repo / name, src / name)
    for name in ("ddpo_lite", "presets"):
        shutil.copytree(repo / name, src / name, ignore=ignore)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["--no-index", str(src), "-w", str(wheels)],
        check=True,
        cwd=tmp_path,
    )
    return next(wheels.glob("ddpo_lite-*.whl"))


@pytest.mark.slow
def test_the_wheel_holds_every_package_and_its_installed_cli_runs(tmp_path):
    """The wheel holds every module of every package (bench/ included), the presets and their
    prompt files, both shapes models; installed into a fresh venv, its CLI runs from outside the repo."""
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(repo).as_posix() for p in (repo / "ddpo_lite").rglob("*.py")}
    expected |= {
        "ddpo_lite/presets/" + p.relative_to(repo / "presets").as_posix()
        for p in (repo / "presets").rglob("*")
        if p.suffix in (".toml", ".txt")
    }
    expected |= {
        p.relative_to(repo).as_posix()
        for folder in ("shapes_model", "shapes_flow_model")
        for p in (repo / "ddpo_lite" / "models" / folder).rglob("*")
        if p.is_file()
    }
    assert "ddpo_lite/bench/__init__.py" in expected
    assert sorted(expected - names) == []
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "ddpo-lite = ddpo_lite.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    # A venv of its own (not --system-site-packages: inside a venv that sees the base interpreter,
    # not this one): the wheel goes in first, then a .pth adds this interpreter's site-packages
    # for the dependencies, after the venv's own, so `import ddpo_lite` finds the wheel's copy.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
        + ["--no-index", str(wheel)],
        check=True,
    )
    site_dir = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (Path(site_dir) / "_test_dependencies.pth").write_text("\n".join(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"

    def run(*argv: str) -> str:
        done = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    script = (
        "import ddpo_lite, ddpo_lite.bench, ddpo_lite.config as c, pathlib;"
        "cfg = c.load_config('aesthetic');"
        "print(ddpo_lite.__file__); print(cfg.prompts.file);"
        "print(len(pathlib.Path(cfg.prompts.file).read_text().splitlines()))"
    )
    shown = run(str(python), "-c", script).splitlines()
    assert shown[0].startswith(site_dir) and shown[1].startswith(site_dir), shown
    assert int(shown[2]) == 46  # 45 animals and a comment line
    listed = run(str(venv / "bin" / "ddpo-lite"), "presets")
    assert "aesthetic" in listed and "tiny" in listed
    estimate = json.loads(
        run(str(venv / "bin" / "ddpo-lite"), "bench", "--preset", "tiny", "--estimate", "--json")
    )
    assert estimate["peak_bytes"] > 0


def test_known_harmless_library_lines_are_silenced_and_others_kept(run_dir, tmp_path):
    """`sample --lora` imports bitsandbytes, transformers' image processors, casts and loads a
    UNet-only LoRA: none of the known-harmless lines reach stderr; a real warning still would."""
    import logging

    from ddpo_lite import _quiet

    argv = ["sample", "--lora", str(run_dir / "lora"), "--prompt", "x", "--num", "1"]
    argv += ["--steps", "2", "--output", str(tmp_path / "s")]
    done = subprocess.run(
        [sys.executable, "-m", "ddpo_lite.cli", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    for text in ("gemm_4bit_forward", "requires torchvision", "kept in float32", "No LoRA keys"):
        assert text not in done.stderr, done.stderr

    _quiet.install()

    def shown(logger: str, message: str) -> bool:
        record = logging.LogRecord(logger, logging.WARNING, __file__, 0, message, None, None)
        return bool(logging.getLogger(logger).filter(record))

    fp32 = "diffusers.models.modeling_utils"
    assert not shown(
        fp32, "There are modules in UNet2DConditionModel that should be kept in float32: []."
    )
    assert shown(
        fp32, "There are modules in UNet2DConditionModel that should be kept in float32: ['x']."
    )
    assert shown(fp32, "something else went wrong")
    lora = "diffusers.loaders.lora_base"
    assert not shown(
        lora, "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'."
    )
    assert shown(
        lora, "No LoRA keys associated to UNet2DConditionModel found with the prefix='unet'."
    )
    assert shown("diffusers.other", "No LoRA keys associated to CLIPTextModel found")


def test_presets_and_rewards_print_their_text_as_written(capsys):
    """rich would read "[n] [animals]" in the counting description as two tags and print ' '."""
    assert main(["presets"]) == 0
    listed = capsys.readouterr().out
    assert "'[n] [animals]'" in listed
    assert "predicted" not in listed  # memory figures come from the estimate, not descriptions


def test_more_user_mistakes_are_one_line(tmp_path, capsys, run_dir, monkeypatch):
    lora = str(run_dir / "lora")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    # a LoRA from another model (tiny:0's LoRA on the shapes model)
    for argv in (
        ["sample", "--lora", lora, "--model", "shapes", "--prompt", "x"],
        ["eval", "--lora", lora, "--model", "shapes", "--prompts", str(prompts)],
    ):
        _one_line_error(capsys, argv, "does not fit the UNet of 'shapes'", "tiny:0", "--model")
    # output paths that are files, or under a file
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    _one_line_error(
        capsys,
        ["train", "--preset", "tiny", "--output", str(a_file), *_args(*SHORT)],
        "is a file",
    )
    _one_line_error(
        capsys, ["sample", "--lora", lora, "--prompt", "x", "--output", str(a_file)], "is a file"
    )
    _one_line_error(
        capsys, ["export", lora, "--output", str(a_file / "k.safetensors")], "is a file"
    )
    # read-only folders (as root every folder is writable: os.access answers as for a user)
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != read_only and real_access(p, mode))
    for argv in (
        ["train", "--preset", "tiny", "--output", str(read_only / "run"), *_args(*SHORT)],
        ["sample", "--lora", lora, "--prompt", "x", "--output", str(read_only)],
        ["export", lora, "--output", str(read_only / "k.safetensors")],
    ):
        _one_line_error(capsys, argv, "cannot write in", str(read_only))
    monkeypatch.undo()
    # consistent checks: sample refuses what train refuses
    _one_line_error(
        capsys, ["sample", "--lora", lora, "--prompt", "x", "--guidance-scale", "-1"], "-1"
    )
    _one_line_error(
        capsys,
        ["bench", "--model", "sd15-random", "--resolution", "60", "--estimate"],
        "--resolution 60",
        "multiple of 8",
    )
    # a device this torch cannot use
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _one_line_error(capsys, ["sample", "--lora", lora, "--prompt", "x", "--device", "cuda"], "cuda")
    _one_line_error(capsys, ["sample", "--lora", lora, "--prompt", "x", "--device", "gpu"], "gpu")
    monkeypatch.undo()
    # a port out of range, refused before the reward loads
    _one_line_error(capsys, ["serve-reward", "jpeg_compressibility", "--port", "99999"], "99999")
    # config: a non-http reward URL; a LoRA target that names no UNet module (at setup)
    out = ["--output", str(tmp_path / "run"), *_args(*SHORT)]
    _one_line_error(
        capsys,
        ["train", "--preset", "tiny", *out, *_args("reward.url='localhost:8123'")],
        "reward.url",
        "http://HOST:PORT",
    )
    err = _one_line_error(
        capsys,
        ["train", "--preset", "tiny", *out, *_args("lora.target_modules=['to_q', 'to_qq']")],
        "'to_qq'",
        "to_out.0",
        "proj_in",
    )
    assert "'to_q'," not in err  # only the unknown one is named as unknown


def test_resume_of_a_run_without_its_checkpoints_refuses(run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints")
    before = (copy / "metrics.jsonl").read_text()
    _one_line_error(capsys, ["train", "--resume", str(copy)], "no checkpoint", "--overwrite")
    assert (copy / "metrics.jsonl").read_text() == before


def test_lora_files_respect_the_umask(run_dir, tmp_path):
    from ddpo_lite.models.lora import _umask

    mask = _umask()
    for path in [run_dir / "lora", *(run_dir / "lora").iterdir()]:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert path.stat().st_mode & 0o777 == want, (path, oct(path.stat().st_mode))
    kohya = run_dir / "lora_kohya.safetensors"
    assert kohya.stat().st_mode & 0o777 == 0o666 & ~mask


def test_overwrite_clears_every_run_file_and_metadata_names_a_weighted_reward(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.copytree(copy / "lora", copy / "best_lora")
    (copy / "stopped.json").write_text("{}")
    (copy / "mine.txt").write_text("not a run file")
    weights = "reward.weights={jpeg_compressibility = 1.0, jpeg_incompressibility = 0.5}"
    argv = ["train", "--preset", "tiny", "--output", str(copy), "--overwrite", "--quiet"]
    assert main([*argv, *_args(*SHORT, weights)]) == 0
    assert not (copy / "best_lora").exists() and not (copy / "stopped.json").exists()
    assert not (copy / "lora_kohya.safetensors").exists()
    assert (copy / "mine.txt").is_file()
    meta = read_lora_metadata(copy / "lora")
    assert meta["reward"] == "1*jpeg_compressibility + 0.5*jpeg_incompressibility"
    assert meta["reward_kind"] == "weighted"
    assert json.loads(meta["reward_config"])["weights"] == {
        "jpeg_compressibility": 1.0,
        "jpeg_incompressibility": 0.5,
    }
    assert "1*jpeg_compressibility + 0.5*jpeg_incompressibility" in (copy / "README.md").read_text()


def test_metadata_names_a_remote_reward_and_a_user_function(tmp_path, capsys):
    from ddpo_lite.config import load_config
    from ddpo_lite.run_files import lora_metadata
    from ddpo_lite.trainer import train

    remote = lora_metadata(load_config("tiny", ["reward.url='http://scorer:8123'"]))
    assert remote["reward"] == "http://scorer:8123" and remote["reward_kind"] == "remote"
    assert json.loads(remote["reward_config"])["url"] == "http://scorer:8123"

    def brightness(images, prompts, metadata):
        return [float(np.asarray(image).mean()) for image in images], {}

    config = load_config("tiny", [*SHORT, "num_epochs=1", f'output_dir="{tmp_path / "run"}"'])
    result = train(config, brightness, show_progress=False)
    meta = read_lora_metadata(result.lora_dir)
    assert meta["reward_kind"] == "function" and meta["reward"].startswith("brightness")
    assert "reward_config" not in meta
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    argv = ["eval", "--lora", str(result.lora_dir), "--prompts", str(prompts), "--num", "1"]
    _one_line_error(capsys, argv, "brightness", "--reward")


def test_shapes_run_card_code_runs_and_eval_uses_the_runs_settings(tmp_path, capsys):
    """The model card's Python loads the shipped shapes model and the LoRA and draws an image;
    `ddpo-lite eval` with no options evaluates as the run did (its num_per_prompt, max_prompts)."""
    import re

    from ddpo_lite.evaluate import evaluate_lora

    out = tmp_path / "shapes"
    sets = ["num_epochs=1", "sample.num_steps=2", "sample.num_batches_per_epoch=1"]
    sets += ["sample.batch_size=4", "train.batch_size=4", "train.gradient_accumulation=1"]
    sets += ["eval.every=0", "eval.max_prompts=1", "eval.num_per_prompt=3"]
    argv = ["train", "--preset", "shapes-alignment", "--output", str(out), "--quiet"]
    assert main([*argv, *_args(*sets)]) == 0
    card = (out / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert 'load_pipeline("shapes")' in code or "load_pipeline('shapes')" in code
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["image"].size == (32, 32)

    base, tuned = evaluate_lora(out / "lora")
    assert set(tuned) == {"train", "heldout"}
    assert all(group.rewards.shape == (1, 3) for group in [*base.values(), *tuned.values()])
    assert main(["eval", "--lora", str(out / "lora")]) == 0
    table = capsys.readouterr().out
    assert "heldout" in table and re.search(r"│\s*3\s*│", table)
