"""Model families: SD 1.x and SDXL behind one seam, on the offline `tiny` and `tiny-sdxl` models.

The rollout of each family is held to the family's own diffusers pipeline (same seed, same
DDIM eta = 1 draws: the same final latents), the on-policy ratio is 1 and the chunked gradient
equals the whole one for SDXL too, and a trained SDXL LoRA loads in
`StableDiffusionXLPipeline.load_lora_weights` and changes its images.
"""

import json
import shutil

import pytest
import torch
from conftest import tiny_config

from ddpo_lite.families import family_of
from ddpo_lite.models import ModelLoadError, load_pipeline
from ddpo_lite.sampling import rollout
from ddpo_lite.trainer import build_components, make_accelerator
from ddpo_lite.update import UpdateSettings, accumulate_step, score_log_probs

FAMILIES = {"sd1": "tiny", "sdxl": "tiny-sdxl"}
HALF = [
    "memory.mixed_precision='bf16'",
    "memory.half_base=true",
    "memory.gradient_checkpointing=true",
]


def _run(tmp_path, model, *overrides):
    config = tiny_config(tmp_path, f'model.name="{model}"', "log_with=[]", *overrides)
    accelerator = make_accelerator(config)
    return config, accelerator, build_components(config, accelerator)


def test_the_family_comes_from_model_index(tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    assert isinstance(load_pipeline("tiny"), StableDiffusionPipeline)
    xl = load_pipeline("tiny-sdxl")
    assert isinstance(xl, StableDiffusionXLPipeline) and family_of(xl).name == "sdxl"

    from ddpo_lite.models.tiny_sdxl import tiny_sdxl_pipeline_dir

    folder = tmp_path / "model"
    shutil.copytree(tiny_sdxl_pipeline_dir(), folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "QwenImagePipeline"})
    )
    with pytest.raises(ModelLoadError, match="QwenImagePipeline.*StableDiffusionXLPipeline"):
        load_pipeline(str(folder))
    # an explicit family loads it whatever the class name says
    assert isinstance(load_pipeline(str(folder), family="sdxl"), StableDiffusionXLPipeline)

    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(ModelLoadError, match="text_encoder_2/"):
        load_pipeline(str(folder))


def sd2_like(folder):
    """The tiny SD model as SD 2.x ships its scheduler: v-prediction, "trailing" spacing."""
    from ddpo_lite.models import tiny_pipeline_dir

    shutil.copytree(tiny_pipeline_dir(), folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(config_file.read_text())
    scheduler.update(prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0)
    config_file.write_text(json.dumps(scheduler))
    return str(folder)


@pytest.mark.parametrize("family", [*FAMILIES, "sd2-v"])
def test_rollout_equals_the_familys_own_pipeline(tmp_path, family):
    """Same seed, same DDIM eta = 1 noise draws in the same order: our rollout's final latents
    are the diffusers pipeline's own output (its encode_prompt, SDXL's pooled embedding and
    time ids, the empty negative prompt as zeros, CFG, the DDIM step; SD 2.x's v-prediction
    and trailing timesteps through the SD 1.x family)."""
    model = sd2_like(tmp_path / "sd2") if family == "sd2-v" else FAMILIES[family]
    config, _, run = _run(tmp_path, model, "sample.num_steps=4")
    if family == "sd2-v":
        assert run.policy.family.name == "sd1"
        assert run.policy.sampler.scheduler.config.prediction_type == "v_prediction"
    prompts = ["a cat", "a dog"]
    _, trajectory = rollout(run.policy, prompts, torch.arange(2), torch.Generator().manual_seed(0))
    pipe = run.pipe
    pipe.scheduler = run.policy.sampler.scheduler
    theirs = pipe(
        prompts,
        num_inference_steps=4,
        guidance_scale=config.sample.guidance_scale,
        eta=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    assert theirs.abs().max() > 1  # not a degenerate output
    torch.testing.assert_close(trajectory.chain[:, -1], theirs.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [[], HALF], ids=["fp32", "bf16-half-base-checkpointing"])
def test_sdxl_on_policy_ratio_is_one(tmp_path, overrides):
    config, _, run = _run(tmp_path, "tiny-sdxl", "sample.num_steps=8", *overrides)
    ids = torch.arange(4) % 4
    texts = [config.prompts.prompts[i] for i in ids]
    _, trajectory = rollout(run.policy, texts, ids, torch.Generator().manual_seed(0))
    run.model.train()
    first = trajectory.index(torch.tensor([2, 0]))  # a train batch unlike the sampling batch
    cols = torch.tensor([[7, 0, 3], [1, 5, 6]])
    with torch.enable_grad():
        new = score_log_probs(run.policy, run.model, first, cols)
    old = first.log_probs[torch.arange(2)[:, None], cols]
    assert (torch.exp(new - old) - 1).abs().max() < 1e-3
    lossy = first.index(torch.arange(2))  # and the check can fail
    lossy.chain = lossy.chain.half().float()
    with torch.enable_grad():
        new_lossy = score_log_probs(run.policy, run.model, lossy, cols)
    assert (torch.exp(new_lossy - old) - 1).abs().max() > 1e-3


def test_sdxl_chunked_gradient_equals_unchunked(tmp_path):
    config, accelerator, run = _run(tmp_path, "tiny-sdxl", "sample.num_steps=4")
    gen = torch.Generator().manual_seed(0)
    for name, p in run.denoiser.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    ids = torch.arange(3) % 4
    texts = [config.prompts.prompts[i] for i in ids]
    _, traj = rollout(run.policy, texts, ids, torch.Generator().manual_seed(0))
    weights, valid = torch.tensor([1.5, -0.7, 0.4]), torch.ones(3, dtype=torch.bool)
    cols = torch.stack([torch.randperm(4, generator=gen)[:3] for _ in range(3)])
    settings = UpdateSettings("ddpo-is", clip_range=0.2)
    whole = [(traj, cols, weights, valid)]
    run.optimizer.zero_grad(set_to_none=True)
    accumulate_step(accelerator, run.policy, run.model, whole, settings, 0)
    reference = [p.grad.clone() for p in run.params]
    assert all(g.abs().sum() > 0 for g in reference)
    run.optimizer.zero_grad(set_to_none=True)
    accumulate_step(accelerator, run.policy, run.model, whole, settings, 1, micro_batch=1)
    for p, ref in zip(run.params, reference, strict=True):
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.slow
def test_sdxl_trains_resumes_and_its_lora_loads_in_diffusers(tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from ddpo_lite.cli import main
    from ddpo_lite.models.lora import read_lora_metadata
    from ddpo_lite.models.tiny_sdxl import tiny_sdxl_pipeline_dir

    out = tmp_path / "run"
    sets = ["model.name=tiny-sdxl", "num_epochs=2", "sample.num_steps=3", "log_with=[]"]
    args = ["train", "--preset", "tiny", "--output", str(out), "--quiet"]
    assert main([*args, *(x for s in sets for x in ("--set", s))]) == 0
    assert main(["train", "--resume", str(out), "--quiet", "--set", "num_epochs=3"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    meta = read_lora_metadata(out / "lora")
    assert meta["family"] == "sdxl" and meta["base_model"] == "tiny-sdxl:0"

    # the LoRA loads in a plain diffusers SDXL pipeline, every tensor, and changes the images
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline_dir())
    pipe.set_progress_bar_config(disable=True)

    def image():
        generator = torch.Generator().manual_seed(0)
        return pipe("a cat", num_inference_steps=3, generator=generator, output_type="pt").images

    before = image()
    pipe.load_lora_weights(str(out / "lora"))
    saved = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("unet.") for k in saved)
    loaded = [n for n, _ in pipe.unet.named_parameters() if "lora_" in n]
    assert len(loaded) == len(saved)
    assert (image() - before).abs().max() > 1e-4

    shots = tmp_path / "shots"
    assert main(["sample", "--lora", str(out / "lora"), "--prompt", "a cat", "--num", "1",
                 "--output", str(shots)]) == 0  # fmt: skip
    assert len(list(shots.glob("*.png"))) >= 1
    prompts = tmp_path / "heldout.txt"
    prompts.write_text("a red fox\n")
    args = ["eval", "--lora", str(out / "lora"), "--prompts", str(prompts), "--num", "1"]
    assert main([*args, "--steps", "2", "--reward", "jpeg_compressibility"]) == 0
    assert main(["export", str(out / "lora"), "--output", str(tmp_path / "k.safetensors")]) == 0
    kohya = load_file(tmp_path / "k.safetensors")
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    from safetensors import safe_open

    with safe_open(tmp_path / "k.safetensors", framework="pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"


def test_a_lora_of_one_family_is_refused_on_another(tmp_path, capsys):
    from ddpo_lite.cli import main
    from ddpo_lite.trainer import train

    config = tiny_config(tmp_path, "model.name=tiny-sdxl", "num_epochs=1", "sample.num_steps=2")
    config.log_with = []
    train(config, show_progress=False)
    lora = str(tmp_path / "run" / "lora")
    code = main(["sample", "--lora", lora, "--model", "tiny", "--prompt", "a", "--num", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "sdxl model" in err and "sd1" in err and "Traceback" not in err
