"""The shapes world: grammar, renderer, pixel scorers, rewards, and the shipped pretrained model."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image, ImageFilter

from ddpo_lite.models import load_pipeline
from ddpo_lite.models.loading import SHAPES_MODEL_DIR
from ddpo_lite.models.lora import attach_lora, save_lora
from ddpo_lite.rewards import get_reward, list_rewards
from ddpo_lite.shapes import (
    COLOURS,
    SHAPES,
    ShapeSpec,
    all_captions,
    analyse,
    caption,
    parse_caption,
    random_spec,
    render,
)
from ddpo_lite.shapes.evaluate import prompt_accuracy
from ddpo_lite.shapes.model import MAX_TOKENS, build_tokenizer

# --- grammar and renderer --------------------------------------------------------------------


def test_grammar_round_trips_and_rejects_other_text():
    captions = all_captions()
    assert len(captions) == len(set(captions)) == 6 * 4 * 5
    for text in captions:
        assert caption(*parse_caption(text)) == text
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_caption("a cat")
    with pytest.raises(ValueError, match="unknown word 'purple'"):
        parse_caption("a purple circle on a blue background")


def test_render_draws_what_the_spec_says():
    spec = ShapeSpec("red", "square", "blue", cx=16, cy=16, half=6)
    pixels = np.asarray(render(spec))
    assert pixels.shape == (32, 32, 3)
    assert tuple(pixels[16, 16]) == COLOURS["red"]  # inside the square
    assert tuple(pixels[0, 0]) == COLOURS["blue"]  # background
    assert tuple(pixels[16, 9]) == COLOURS["blue"]  # just left of its edge at x = 10
    # a triangle's apex is at the top: its top row is narrower than its bottom row
    tri = np.asarray(render(ShapeSpec("white", "triangle", "black", 16, 16, 8)))[..., 0] > 128
    assert tri[9].sum() < tri[22].sum()


def test_random_specs_keep_the_object_inside_the_border():
    rng = np.random.default_rng(0)
    for _ in range(200):
        spec = random_spec(rng)
        assert spec.colour != spec.background
        border = np.asarray(render(spec))[[0, -1]].reshape(-1, 3)
        assert (border == COLOURS[spec.background]).all()


def test_tokenizer_has_one_token_per_grammar_word():
    tokenizer = build_tokenizer()
    ids = tokenizer("a yellow diamond on a black background").input_ids
    assert len(ids) == 7 + 2  # BOS, 7 words, EOS
    assert tokenizer.model_max_length == MAX_TOKENS
    assert (
        tokenizer.decode(ids, skip_special_tokens=True) == "a yellow diamond on a black background"
    )


# --- pixel scorers against the renderer's ground truth ---------------------------------------


@pytest.mark.parametrize("blur", [0.0, 0.7])
def test_scorer_reads_back_rendered_images(blur):
    """On 300 random renders (sharp, and blurred as a decoder would), every attribute is read back
    right: the scorer is not the source of any error the model-accuracy test measures."""
    rng = np.random.default_rng(1)
    wrong = []
    for _ in range(300):
        spec = random_spec(rng)
        image = render(spec)
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        a = analyse(image)
        got = (a.best(a.colour), a.best(a.shape), a.best(a.background))
        if got != (spec.colour, spec.shape, spec.background):
            wrong.append((spec, got))
    assert not wrong, wrong[:3]


def test_scorer_finds_nothing_in_a_plain_image():
    a = analyse(Image.new("RGB", (32, 32), COLOURS["green"]))
    assert not a.found
    assert a.best(a.background) == "green"
    assert sum(a.shape.values()) == 0 and sum(a.colour.values()) == 0


# --- rewards ---------------------------------------------------------------------------------


def test_rewards_are_registered():
    names = list_rewards()
    assert {"shapes_colour", "shapes_shape", "shapes_alignment"} <= set(names)


def _other(options, value, rng):
    return str(rng.choice([o for o in options if o != value]))


def test_rewards_score_the_drawn_caption_high_and_mismatches_low():
    """An image drawn for caption X: high reward for X; low for a caption with another colour
    (colour reward) or another shape (shape reward); the sum separates all three."""
    rng = np.random.default_rng(2)
    specs = [random_spec(rng) for _ in range(96)]
    images = [render(s) for s in specs]
    right = [s.caption for s in specs]
    other_colour = [
        caption(
            _other([c for c in COLOURS if c != s.background], s.colour, rng), s.shape, s.background
        )
        for s in specs
    ]
    other_shape = [caption(s.colour, _other(SHAPES, s.shape, rng), s.background) for s in specs]
    colour, shape, total = (
        get_reward(n) for n in ("shapes_colour", "shapes_shape", "shapes_alignment")
    )
    meta = [{}] * len(images)

    r_colour, info = colour(images, right, meta)
    assert r_colour.shape == (96,) and r_colour.min() > 0.99
    assert info["colour_right"].all() and info["shape_right"].all()
    assert colour(images, other_colour, meta)[0].max() < 0.01
    assert colour(images, other_shape, meta)[0].min() > 0.99  # shape does not enter colour

    r_shape = shape(images, right, meta)[0]
    assert r_shape.min() > 0.5 and r_shape.mean() > 0.9
    assert shape(images, other_shape, meta)[0].mean() < 0.05
    assert shape(images, other_colour, meta)[0].min() > 0.5  # colour does not enter shape

    r_total = total(images, right, meta)[0]
    np.testing.assert_allclose(r_total, r_colour + r_shape)
    assert r_total.mean() > 1.9
    assert total(images, other_shape, meta)[0].mean() < 1.1
    assert total(images, other_colour, meta)[0].mean() < 1.1


def test_rewards_reject_prompts_outside_the_grammar_and_score_empty_images_zero():
    reward = get_reward("shapes_alignment")
    plain = Image.new("RGB", (32, 32), COLOURS["blue"])
    rewards, _ = reward([plain], ["a red circle on a blue background"], [{}])
    assert rewards.tolist() == [0.0]
    with pytest.raises(ValueError, match="not a shapes caption"):
        reward([plain], ["a photo of a cat"], [{}])


# --- the shipped pretrained model ------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_pipe():
    torch.set_num_threads(1)
    return load_pipeline("shapes")


def test_shipped_weights_are_small_safetensors():
    files = [p for p in SHAPES_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 15 * 2**20
    weights = [p for p in files if p.suffix in {".safetensors", ".bin", ".pt", ".ckpt", ".pth"}]
    assert len(weights) == 3 and all(p.suffix == ".safetensors" for p in weights)
    assert (SHAPES_MODEL_DIR / "README.md").is_file()


def test_load_pipeline_shapes(shapes_pipe):
    pipe = shapes_pipe
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    out = pipe(
        "a green triangle on a white background",
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images[0].size == (32, 32)


def test_cli_samples_the_shapes_model(tmp_path: Path):
    from ddpo_lite.cli import main

    prompt = "a green triangle on a white background"
    argv = ["sample", "--model", "shapes", "--prompt", prompt, "--num", "2", "--steps", "4"]
    assert main([*argv, "--output", str(tmp_path)]) == 0
    pngs = sorted(tmp_path.rglob("*.png"))
    assert len(pngs) >= 2
    assert Image.open(pngs[0]).size[0] >= 32


def test_lora_on_shapes_loads_in_plain_diffusers(shapes_pipe, tmp_path: Path):
    """A LoRA attached to the shapes UNet and saved as the trainer saves it loads with diffusers'
    `load_lora_weights`, every tensor, and changes the UNet's output."""
    base = load_pipeline("shapes")
    attach_lora(base.unet, rank=4, alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in base.unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: give the adapter an effect
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    folder = tmp_path / "lora"
    save_lora(base.unet, folder, {"base_model": "shapes"})
    trained = {k: v for k, v in base.unet.state_dict().items() if "lora_" in k}

    pipe = load_pipeline("shapes")
    x = torch.randn(1, 4, 16, 16, generator=gen)
    emb = torch.randn(1, MAX_TOKENS, 64, generator=gen)
    with torch.no_grad():
        before = pipe.unet(x, 500, encoder_hidden_states=emb).sample
        pipe.load_lora_weights(folder)
        after = pipe.unet(x, 500, encoder_hidden_states=emb).sample
    loaded = {k: v for k, v in pipe.unet.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(trained) > 0
    for a, b in zip(sorted(loaded.items()), sorted(trained.items()), strict=True):
        assert torch.equal(a[1].float(), b[1].float()), a[0]
    assert (after - before).abs().max() > 1e-4


# The band for shape, the attribute RL targets. Measured with this check (128 samples, seed 0) on
# two models trained by scripts/train_shapes_model.py with its defaults:
#   seed 0 (shipped): colour 0.84 (chance 0.18), shape 0.53 (chance 0.22), background 0.73 (0.18)
#   seed 1:           colour 0.88 (chance 0.16), shape 0.48 (chance 0.30), background 0.66 (0.16)
# Both lie in [0.35, 0.80]: far from perfect (RL has room), above chance. The ratio to chance is
# asserted at 1.5x: seed 0 gives 2.4x; seed 1 gives 1.6x here (1.3x on its 64-sample check in
# training), so a model retrained with another seed sits near that edge.
SHAPE_BAND = (0.35, 0.80)


def test_shapes_model_follows_prompts_above_chance_below_perfect(shapes_pipe):
    """Item 3 of issue 5: on 128 seeded samples, each prompted attribute read from pixels beats
    the same images scored against shuffled prompts; shape, the attribute RL targets, sits in a
    band clearly above chance and clearly below perfect."""
    acc = prompt_accuracy(shapes_pipe, 128, seed=0)
    for name in ("colour", "shape", "background"):
        assert acc[name] > 1.5 * acc[name + "_chance"], acc
    low, high = SHAPE_BAND
    assert low <= acc["shape"] <= high, acc


def test_red_share_reward_counts_red_pixels_whatever_the_prompt():
    from PIL import Image

    from ddpo_lite.rewards.registry import get_reward

    half = Image.new("RGB", (32, 32), (0, 0, 255))
    half.paste((250, 10, 10), (0, 0, 32, 16))  # top half near-red
    images = [
        Image.new("RGB", (32, 32), (255, 0, 0)),
        Image.new("RGB", (32, 32), (0, 0, 255)),
        half,
    ]
    rewards, info = get_reward("shapes_red_share")(
        images, ["a blue circle on a red background"] * 3, [{}] * 3
    )
    np.testing.assert_allclose(rewards, [1.0, 0.0, 0.5])
    np.testing.assert_allclose(info["red_share"], rewards)
