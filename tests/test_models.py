"""Pipeline loading and the offline tiny model (CPU, no network)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from ddpo_lite.models import ModelLoadError, build_tiny_pipeline, load_pipeline, tiny_pipeline_dir
from ddpo_lite.models.tiny import _word_list, build_tiny_tokenizer

WEIGHT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One tiny cache for the module, so the seed-0 pipeline is written once."""
    root = tmp_path_factory.mktemp("ddpo-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDPO_LITE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def pipe(cache_dir: Path) -> StableDiffusionPipeline:
    return load_pipeline("tiny")


def _generate(pipe: StableDiffusionPipeline, prompt: str) -> np.ndarray:
    return pipe(
        prompt,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_tiny_loads_from_cache_folder(pipe: StableDiffusionPipeline, cache_dir: Path) -> None:
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None

    folder = tiny_pipeline_dir(0)
    assert folder.parent == cache_dir
    assert Path(pipe.config._name_or_path) == folder
    assert (folder / "model_index.json").is_file()
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    assert set(WEIGHT_FILES.values()) <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temp folder left

    sched = pipe.scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (
        0.00085,
        0.012,
        "scaled_linear",
    )
    assert (sched.steps_offset, sched.clip_sample, sched.set_alpha_to_one) == (1, False, False)
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id


def test_tiny_is_deterministic_per_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_dir: Path
) -> None:
    def weights(cache: Path, seed: int) -> dict[str, dict[str, torch.Tensor]]:
        monkeypatch.setenv("DDPO_LITE_CACHE", str(cache))
        folder = tiny_pipeline_dir(seed)
        assert folder.parent == cache
        return {name: load_file(folder / rel) for name, rel in WEIGHT_FILES.items()}

    first = weights(cache_dir, 0)
    second = weights(tmp_path / "other", 0)
    other_seed = weights(tmp_path / "other", 1)
    for name, state in first.items():
        assert state.keys() == second[name].keys()
        assert all(torch.equal(state[k], second[name][k]) for k in state), name
        assert any(not torch.equal(state[k], other_seed[name][k]) for k in state), name
    seeded = load_pipeline("tiny:1").unet.state_dict()
    assert all(torch.equal(seeded[k], other_seed["unet"][k]) for k in other_seed["unet"])
    # building in memory matches the cached files, and leaves the global RNG alone
    rng = torch.get_rng_state()
    built = build_tiny_pipeline(0)
    assert torch.equal(rng, torch.get_rng_state())
    unet_state = built.unet.state_dict()
    assert all(torch.equal(unet_state[k], first["unet"][k]) for k in first["unet"])


def test_tokenizer_splits_words(pipe: StableDiffusionPipeline) -> None:
    tok = build_tiny_tokenizer()
    text = "a red cat riding a bike"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in text.split()]
    assert tok.decode(ids, skip_special_tokens=True) == text
    for word in _word_list():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word

    unknown = "zxqwv glorbix"
    unk_ids = tok(unknown, add_special_tokens=False).input_ids
    assert len(unk_ids) > 2
    assert tok.decode(unk_ids) == unknown

    # the tokenizer saved with the pipeline and read back gives the same ids, padded to 77
    for prompt in [text, unknown, "Three BLUE squares, 42 stars!"]:
        assert pipe.tokenizer(prompt).input_ids == tok(prompt).input_ids
    padded = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length)
    assert len(padded.input_ids) == 77


def test_pipeline_runs_and_follows_the_prompt(pipe: StableDiffusionPipeline) -> None:
    red = _generate(pipe, "a red circle")
    assert red.shape == (1, 32, 32, 3)
    assert np.isfinite(red).all()
    assert red.std() > 0.01
    np.testing.assert_array_equal(red, _generate(pipe, "a red circle"))
    blue = _generate(pipe, "a blue dog")
    assert np.abs(red - blue).max() > 1e-3


def test_load_local_folder(cache_dir: Path, tmp_path: Path) -> None:
    folder = tiny_pipeline_dir(0)
    copy = tmp_path / "my sd model"
    shutil.copytree(folder, copy)
    pipe = load_pipeline(str(copy), torch_dtype=torch.float16)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert pipe.unet.dtype == torch.float16

    index = json.loads((copy / "model_index.json").read_text())
    del index["vae"]
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="'vae' in model_index.json"):
        load_pipeline(str(copy))

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="single-file checkpoints are not supported"):
        load_pipeline(str(checkpoint))

    (copy / "model_index.json").unlink()
    with pytest.raises(ModelLoadError, match="model_index.json") as excinfo:
        load_pipeline(str(copy))
    assert str(copy) in str(excinfo.value)


def _allow_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo the suite-wide HF_HUB_OFFLINE so the network path itself is exercised."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_hub_id_without_network_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    _allow_hub(monkeypatch)
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as excinfo:
        load_pipeline("nonexistent-org/nonexistent-model")
    assert time.monotonic() - start < 20
    message = str(excinfo.value)
    assert "\n" not in message
    assert "nonexistent-org/nonexistent-model" in message
    assert '"tiny"' in message


def test_hub_probe_that_hangs_is_cut_short(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    _allow_hub(monkeypatch)
    monkeypatch.setenv("DDPO_LITE_HUB_TIMEOUT", "0.5")
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: time.sleep(5))
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="could not be reached") as excinfo:
        load_pipeline("some-org/some-model")
    assert time.monotonic() - start < 3
    assert "\n" not in str(excinfo.value)


def test_offline_mode_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_pipeline("some-org/some-model")


@pytest.mark.parametrize("bad", ["foo bar", "a/b/c/does-not-exist", "not-a-folder"])
def test_unrecognised_names_list_accepted_forms(bad: str) -> None:
    with pytest.raises(ModelLoadError, match="accepted forms") as excinfo:
        load_pipeline(bad)
    assert "tiny" in str(excinfo.value)
