"""The FLUX families on their offline tiny models: `flux` (FLUX.1-dev, and -schnell without the
guidance embedding) and `flux2` (FLUX.2-klein).

Each rollout with sample.eta = 0 (the ODE) is held to the family's own diffusers pipeline from
the same initial latents (its encode_prompt, packed latents and ids, sigma grid with mu,
timestep / 1000, guidance embedding or CFG); the on-policy PPO ratio is 1 with eta 0.7; a GRPO
run trains, resumes and samples through the CLI, and its LoRA loads in the family's diffusers
loader and changes the images; settings a family cannot take fail at setup in one line.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_config

from ddpo_lite.config import ConfigError
from ddpo_lite.families import family_of
from ddpo_lite.models import load_pipeline
from ddpo_lite.sampling import rollout
from ddpo_lite.trainer import build_components, make_accelerator
from ddpo_lite.update import score_log_probs

MODELS = {"flux": "tiny-flux", "flux2": "tiny-flux2"}


def _run(tmp_path, model, *overrides):
    config = tiny_config(tmp_path, f'model.name="{model}"', "log_with=[]", *overrides)
    return config, build_components(config, make_accelerator(config))


def _schnell(tmp_path) -> str:
    from ddpo_lite.models.tiny_flux import tiny_flux_pipeline_dir

    return str(tiny_flux_pipeline_dir(guidance_embeds=False))


@pytest.mark.parametrize("variant", ["flux", "flux-schnell", "flux2"])
def test_rollout_equals_the_familys_own_pipeline(tmp_path, variant):
    """eta = 0, same initial noise: our final latents are the pipeline's output_type="latent"
    (FLUX.1: packed; klein: unpacked and de-normalised, which `unpack` reproduces), and the
    sampler's sigma grid is the pipeline's own (custom sigmas + mu)."""
    model = _schnell(tmp_path) if variant == "flux-schnell" else MODELS[variant.split("-")[0]]
    config, run = _run(
        tmp_path, model, "sample.num_steps=4", "sample.eta=0.0", "train.algorithm='rwr'"
    )
    pipe, family = run.pipe, run.policy.family
    assert (
        family.name == variant.split("-")[0] and type(pipe).__name__ in family.pipeline_class_names
    )
    assert bool(pipe.transformer.config.guidance_embeds) == (variant == "flux")
    prompts = ["a cat", "a dog"]
    _, trajectory = rollout(run.policy, prompts, torch.arange(2), torch.Generator().manual_seed(0))
    shape = family.latent_shape(pipe, 2, 32)
    assert trajectory.chain.shape[-2:] == shape[1:] == (64, 16)  # packed: 8x8 tokens of 4x4 ch
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))  # the rollout's draw
    if family.name == "flux2":  # the klein pipeline takes the patchified (B, 4C, h/2, w/2) grid
        noise = noise.permute(0, 2, 1).reshape(2, 16, 8, 8)
    theirs = pipe(
        prompt=prompts,
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=config.sample.guidance_scale,
        latents=noise,
        output_type="latent",
    ).images
    ours = trajectory.final_latents
    if family.name == "flux2":
        ours = family.unpack(pipe, ours)
    assert theirs.abs().max() > 1  # not a degenerate output
    torch.testing.assert_close(run.policy.sampler.sigmas, pipe.scheduler.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5)
    print(f"{variant}: max |ours - pipeline| = {(ours - theirs).abs().max().item():.3g}")
    # decoding (unpack; FLUX.1's scale and shift, klein's batch-norm statistics) as the pipeline's
    images = family.decode(pipe, trajectory.final_latents)
    pils = pipe(
        prompt=prompts,
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=config.sample.guidance_scale,
        latents=noise,
    ).images
    for image, pil in zip(images, pils, strict=True):
        assert image.size == (32, 32)
        assert np.abs(np.asarray(image, int) - np.asarray(pil, int)).max() <= 1


@pytest.mark.parametrize("family", list(MODELS))
def test_on_policy_ratio_is_one(tmp_path, family):
    config, run = _run(
        tmp_path,
        MODELS[family],
        "sample.num_steps=4",
        "sample.eta=0.7",
        "train.algorithm='grpo'",
        "sample.group_size=2",
    )
    ids = torch.tensor([0, 0, 1, 1])
    texts = [config.prompts.prompts[i] for i in ids]
    generator = torch.Generator().manual_seed(0)
    _, trajectory = rollout(run.policy, texts, ids, generator, group_size=2)
    run.model.train()
    first = trajectory.index(torch.tensor([3, 0]))  # a train batch unlike the sampling batch
    cols = torch.tensor([[3, 0], [1, 2]])
    with torch.enable_grad():
        new = score_log_probs(run.policy, run.model, first, cols)
    old = first.log_probs[torch.arange(2)[:, None], cols]
    on_policy = (torch.exp(new - old) - 1).abs().max()
    print(f"{family}: on-policy max |ratio - 1| = {on_policy.item():.3g}")
    assert on_policy < 1e-5
    gen = torch.Generator().manual_seed(1)  # and the check can fail: a moved LoRA moves it
    for name, p in run.denoiser.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen))
    with torch.enable_grad():
        moved = score_log_probs(run.policy, run.model, first, cols)
    assert (torch.exp(moved - old) - 1).abs().max() > max(1e-4, 100 * on_policy)


def test_flux_grpo_trains_resumes_samples_and_its_lora_loads_in_diffusers(tmp_path, monkeypatch):
    """Trained on 8 T5 tokens (model.max_sequence_length): the LoRA records them, and `sample`
    and `eval` encode the prompts with them."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from ddpo_lite.cli import main
    from ddpo_lite.models.lora import read_lora_metadata
    from ddpo_lite.models.tiny_flux import tiny_flux_pipeline_dir

    out = tmp_path / "run"
    sets = [
        'model.name="tiny-flux"',
        "num_epochs=2",
        "sample.num_steps=3",
        "sample.num_batches_per_epoch=1",
        "sample.eta=0.7",
        "train.algorithm='grpo'",
        "sample.group_size=2",
        "log_with=[]",
        "model.max_sequence_length=8",
    ]
    args = ["train", "--preset", "tiny", "--output", str(out), "--quiet"]
    assert main([*args, *(x for s in sets for x in ("--set", s))]) == 0
    assert main(["train", "--resume", str(out), "--quiet", "--set", "num_epochs=3"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    meta = read_lora_metadata(out / "lora")
    assert meta["family"] == "flux" and meta["base_model"] == "tiny-flux:0"
    assert meta["max_sequence_length"] == "8"

    pipe = FluxPipeline.from_pretrained(tiny_flux_pipeline_dir())
    pipe.set_progress_bar_config(disable=True)

    def image():
        generator = torch.Generator().manual_seed(0)
        return pipe(
            "a cat",
            height=32,
            width=32,
            num_inference_steps=3,
            generator=generator,
            output_type="pt",
        ).images

    before = image()
    pipe.load_lora_weights(str(out / "lora"))
    saved = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert saved and all(k.startswith("transformer.") for k in saved)
    loaded = [n for n, _ in pipe.transformer.named_parameters() if "lora_" in n]
    assert len(loaded) == len(saved)
    assert (image() - before).abs().max() > 1e-4

    lengths = []  # T5 tokens of every prompt encoding from here on, read off the embeddings
    encode = FluxPipeline.encode_prompt

    def spy(self, *args, **kwargs):
        embeds, pooled, ids = encode(self, *args, **kwargs)
        lengths.append(embeds.shape[1])
        return embeds, pooled, ids

    monkeypatch.setattr(FluxPipeline, "encode_prompt", spy)
    shots = tmp_path / "shots"
    assert main(["sample", "--lora", str(out / "lora"), "--prompt", "a cat", "--num", "1",
                 "--output", str(shots)]) == 0  # fmt: skip
    assert len(list(shots.glob("000_*.png"))) == 1
    assert lengths and set(lengths) == {8}
    lengths.clear()
    from ddpo_lite.evaluate import evaluate_lora

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    evaluate_lora(
        out / "lora",
        prompt_files={"one": str(prompts)},
        reward_name="jpeg_compressibility",
        num_per_prompt=1,
    )
    assert lengths and set(lengths) == {8}


def test_flux2_lora_loads_in_the_klein_pipeline(tmp_path):
    from diffusers import Flux2KleinPipeline

    from ddpo_lite.models.lora import save_lora
    from ddpo_lite.models.tiny_flux2 import tiny_flux2_pipeline_dir

    _, run = _run(tmp_path, "tiny-flux2", "sample.num_steps=2")
    gen = torch.Generator().manual_seed(0)
    for name, p in run.denoiser.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    save_lora(run.denoiser, tmp_path / "lora", {"family": "flux2"}, run.policy.family)

    pipe = Flux2KleinPipeline.from_pretrained(tiny_flux2_pipeline_dir())
    pipe.set_progress_bar_config(disable=True)

    def image():
        generator = torch.Generator().manual_seed(0)
        return pipe(
            prompt="a cat", height=32, width=32, num_inference_steps=2, generator=generator,
            output_type="pt",
        ).images  # fmt: skip

    before = image()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert any("lora_" in n for n, _ in pipe.transformer.named_parameters())
    assert (image() - before).abs().max() > 1e-4


def test_settings_a_flux_family_cannot_take_fail_at_setup(tmp_path, capsys):
    from ddpo_lite.cli import main

    sets = ['model.name="tiny-flux"', 'prompts.negative_prompt="blurry"', "log_with=[]"]
    args = ["train", "--preset", "tiny", "--output", str(tmp_path / "run"), "--quiet"]
    assert main([*args, *(x for s in sets for x in ("--set", s))]) == 2
    err = capsys.readouterr().err.strip()
    assert "negative_prompt" in err and "flux" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1

    # a step-distilled klein samples without guidance: a guidance scale > 1 is refused
    from ddpo_lite.models.tiny_flux2 import tiny_flux2_pipeline_dir

    folder = tmp_path / "klein-distilled"
    shutil.copytree(tiny_flux2_pipeline_dir(), folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    assert family_of(load_pipeline(str(folder))).name == "flux2"
    with pytest.raises(ConfigError, match="distilled.*guidance_scale = 1"):
        _run(tmp_path, str(folder), "sample.guidance_scale=4.0")
    _run(tmp_path, str(folder), "sample.guidance_scale=1.0")  # and without guidance it runs


def test_klein_encodes_without_the_lm_heads_logits():
    """Qwen3's LM head is never run while prompts are encoded (its logits, ~20 GiB for 64
    prompts at full size, are not read), and the embeddings are the pipeline's own."""
    from ddpo_lite.families import family_of
    from ddpo_lite.models import load_pipeline

    pipe = load_pipeline("tiny-flux2")
    calls = []
    hook = pipe.text_encoder.lm_head.register_forward_hook(lambda *args: calls.append(1))
    theirs, _ = pipe.encode_prompt(["a cat", "a dog"], device="cpu")
    assert calls  # the pipeline alone runs the head
    calls.clear()
    cond, negative = family_of(pipe).encode(pipe, ["a cat", "a dog"], torch.device("cpu"), "", 32)
    assert not calls
    torch.testing.assert_close(cond["prompt_embeds"], theirs, rtol=0, atol=0)
    assert isinstance(pipe.text_encoder.lm_head, torch.nn.Linear)  # put back
    hook.remove()


@pytest.mark.parametrize("family", list(MODELS))
def test_flux_families_encode_the_configured_text_tokens(tmp_path, family):
    """model.max_sequence_length sets the T5 (FLUX.1) / Qwen3 (klein) tokens, the negative
    prompt's too; -1 is the pipelines' 512."""
    for setting, tokens in ((-1, 512), (16, 16)):
        _, run = _run(tmp_path, MODELS[family], f"model.max_sequence_length={setting}")
        cond, negative = run.policy.encoder(["a cat", "a dog"])
        assert cond["prompt_embeds"].shape[:2] == (2, tokens)
        assert negative["prompt_embeds"].shape[:2] == (1, tokens)


def test_text_tokens_a_flux_family_cannot_take_fail_at_setup(tmp_path):
    """0 leaves FLUX.1 and klein no text token (FLUX.1's CLIP gives a pooled vector only; T5's
    tokenizer asked for 0 truncates nothing, klein's reshape fails); T5 takes at most 512 (the
    pipeline refuses more when it samples), klein's Qwen3 its position limit."""
    for model in MODELS.values():
        with pytest.raises(ConfigError, match=r"max_sequence_length = 0 is outside \[1, "):
            _run(tmp_path, model, "model.max_sequence_length=0")
    with pytest.raises(ConfigError, match=r"\[1, 512\].*FluxPipeline refuses more than 512"):
        _run(tmp_path, "tiny-flux", "model.max_sequence_length=513")
    most = load_pipeline("tiny-flux2").text_encoder.config.max_position_embeddings
    with pytest.raises(ConfigError, match=f"\\[1, {most}\\].*Qwen3's {most} positions"):
        _run(tmp_path, "tiny-flux2", f"model.max_sequence_length={most + 1}")
