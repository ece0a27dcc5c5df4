"""The model-based rewards on tiny random models of the published architectures.

Nothing can be downloaded here, so each test builds a tiny model of the same architecture, writes
it in the published format (a transformers folder, or the original checkpoint's keys) to a temp
folder, builds the reward through the registry with `model=<that folder or file>`, and holds the
reward against a reference computed in the test: from the tiny model's own forward with plain
matmuls for the heads, and for converted checkpoints through the source model the checkpoint
was written from (the test's key mapping is written independently of the reward's).
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddpo_lite.rewards import get_reward

PROMPTS = ["a red cat", "a dog", "a cat and a dog", "red", "a red red dog on a cat"]
WORDS = ["a", "red", "cat", "dog", "and", "on", "the", "image", "contains"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n=5, seed=0, sizes=((48, 48), (40, 52), (64, 44))):
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8))
        for i in range(n)
    ]


def score(reward, n=5):
    return reward(images(n), PROMPTS[:n], [{} for _ in range(n)])


def assert_batching(make_reward, expected):
    """Batch size 2 over 5 samples == one sample at a time == the reference."""
    rewards, _ = score(make_reward(batch_size=2))
    assert rewards.shape == (5,) and rewards.dtype == np.float32
    np.testing.assert_allclose(rewards, expected, rtol=1e-4, atol=1e-5)
    single = make_reward(batch_size=1)
    one_by_one = [single([im], [p], [{}])[0][0] for im, p in zip(images(), PROMPTS, strict=True)]
    np.testing.assert_allclose(rewards, one_by_one, rtol=1e-4, atol=1e-5)
    assert np.ptp(rewards) > 0  # the samples are told apart: a constant would pass otherwise


# --- tiny CLIP ------------------------------------------------------------------------------


def _bytes_to_unicode():
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def clip_tokenizer(folder):
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))


def tiny_clip_config(projection_dim=16):
    from transformers import CLIPConfig

    text = dict(
        vocab_size=514,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        hidden_act="gelu",
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=30,
        patch_size=6,
        hidden_act="gelu",
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_tiny_clip(folder, projection_dim=16, seed=0, weights=True):
    """A random CLIPModel (unless weights=False: config only) and its processor in `folder`."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(projection_dim)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    if weights:
        model.save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}
    )
    CLIPProcessor(
        image_processor=image_processor, tokenizer=clip_tokenizer(folder)
    ).save_pretrained(folder)
    return model


def pil_clip_image_processor_class():
    """CLIP's PIL-backend image processor class: CLIPImageProcessorPil in transformers 5
    (where CLIPImageProcessor is torchvision's when torchvision is installed), else
    CLIPImageProcessor."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def reference_cosine(model, folder, pixels=None):
    """cos(image, text) from the tiny CLIP's own features, tokenizer and PIL image processor
    (or the given `pixels`)."""
    from transformers import CLIPTokenizer

    if pixels is None:
        processor = pil_clip_image_processor_class().from_pretrained(folder)
        pixels = processor(images=images(), return_tensors="pt")["pixel_values"]
    tokens = CLIPTokenizer.from_pretrained(folder)(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
    image, text = getattr(image, "pooler_output", image), getattr(text, "pooler_output", text)
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return (image * text).sum(-1).numpy()


# --- aesthetic ------------------------------------------------------------------------------


def published_head_state(seed=1, input_size=768):
    """A random head in the published state dict layout: layers.0/2/4/6/7 (dropouts between)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = {0: (1024, input_size), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    state = {}
    for index, (out, inp) in sizes.items():
        state[f"layers.{index}.weight"] = torch.randn(out, inp, generator=generator) / inp**0.5
        state[f"layers.{index}.bias"] = torch.randn(out, generator=generator) * 0.1
    return state


@pytest.fixture(scope="module")
def aesthetic_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aesthetic")
    clip = save_tiny_clip(folder / "clip", projection_dim=768)
    head = published_head_state()
    torch.save(head, folder / "aesthetic-model.pth")
    return folder, clip, head


def test_aesthetic_matches_head_by_hand(aesthetic_files):
    folder, clip, head = aesthetic_files
    pixels = pil_clip_image_processor_class().from_pretrained(folder / "clip")(
        images=images(), return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        embeds = clip.get_image_features(pixel_values=pixels)
    embeds = getattr(embeds, "pooler_output", embeds)
    x = embeds / embeds.norm(dim=-1, keepdim=True)  # (5, 768), L2-normalised
    for index in (0, 2, 4, 6, 7):  # no activation between the layers, as published
        x = x @ head[f"layers.{index}.weight"].T + head[f"layers.{index}.bias"]
    expected = x.squeeze(-1).numpy()

    def make(batch_size):
        return get_reward(
            "aesthetic",
            model=str(folder / "clip"),
            head=str(folder / "aesthetic-model.pth"),
            batch_size=batch_size,
        )

    assert_batching(make, expected)
    # the embedding is normalised: the unnormalised one gives another score
    assert not np.allclose(expected, _head_on(embeds, head), rtol=1e-3)


def _head_on(x, head):
    for index in (0, 2, 4, 6, 7):
        x = x @ head[f"layers.{index}.weight"].T + head[f"layers.{index}.bias"]
    return x.squeeze(-1).numpy()


def test_aesthetic_head_files(aesthetic_files, tmp_path):
    from safetensors.torch import save_file

    from ddpo_lite.rewards._models import RewardModelError

    folder, _, head = aesthetic_files
    save_file(head, tmp_path / "aesthetic-model.safetensors")  # a folder with safetensors
    by_folder = get_reward("aesthetic", model=str(folder / "clip"), head=str(tmp_path))
    by_file = get_reward("aesthetic", model=str(folder / "clip"), head=str(folder))
    np.testing.assert_allclose(score(by_folder)[0], score(by_file)[0], rtol=1e-5)

    # one local folder with the CLIP and the head: what `reward.models.aesthetic` can name
    save_file(head, folder / "clip" / "aesthetic-model.safetensors")
    together = get_reward("aesthetic", model=str(folder / "clip"))
    np.testing.assert_allclose(score(together)[0], score(by_file)[0], rtol=1e-5)
    (folder / "clip" / "aesthetic-model.safetensors").unlink()

    renamed = {k.replace("layers.", "mlp."): v for k, v in head.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(RewardModelError, match="missing"):
        get_reward("aesthetic", model=str(folder / "clip"), head=str(tmp_path / "renamed.pth"))

    torch.save({**head, "payload": Image.new("RGB", (2, 2))}, tmp_path / "pickled.pth")
    with pytest.raises(RewardModelError, match="weights_only"):
        get_reward("aesthetic", model=str(folder / "clip"), head=str(tmp_path / "pickled.pth"))


def test_aesthetic_offload_and_dtype(aesthetic_files):
    folder, _, _ = aesthetic_files
    reward = get_reward(
        "aesthetic", model=str(folder / "clip"), head=str(folder), offload=True, dtype="bf16"
    )
    half = score(reward)[0]
    full = score(get_reward("aesthetic", model=str(folder / "clip"), head=str(folder)))[0]
    assert half.dtype == np.float32
    assert all(
        p.dtype == torch.bfloat16 and p.device.type == "cpu"
        for m in reward.models
        for p in m.parameters()
    )
    np.testing.assert_allclose(half, full, rtol=0.05, atol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_aesthetic_fp16_on_gpu_and_offloaded_between_calls(aesthetic_files):
    folder, _, _ = aesthetic_files
    cpu = score(get_reward("aesthetic", model=str(folder / "clip"), head=str(folder)))[0]
    reward = get_reward(
        "aesthetic", model=str(folder / "clip"), head=str(folder), device="cuda", offload=True
    )
    gpu = score(reward)[0]
    np.testing.assert_allclose(gpu, cpu, rtol=0.02, atol=0.02)
    params = [p for m in reward.models for p in m.parameters()]
    assert all(p.dtype == torch.float16 and p.device.type == "cpu" for p in params)


# --- CLIPScore and PickScore ----------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return folder, save_tiny_clip(folder, seed=7)


def test_clip_score(clip_folder):
    folder, model = clip_folder
    cosine = reference_cosine(model, folder)
    assert (cosine > 0).any() and (cosine < 0).any()  # both sides of the clamp at 0

    def make(batch_size):
        return get_reward("clip_score", model=str(folder), batch_size=batch_size, scale=2.5)

    assert_batching(make, 2.5 * np.maximum(cosine, 0))
    rewards, info = score(make(4))
    np.testing.assert_allclose(info["clip_cosine"], cosine, rtol=1e-4, atol=1e-5)


def test_pickscore(clip_folder):
    folder, model = clip_folder
    expected = np.exp(2.0) * reference_cosine(model, folder)  # logit_scale was set to 2.0

    def make(batch_size):
        return get_reward("pickscore", model=str(folder), batch_size=batch_size)

    assert_batching(make, expected)


# --- HPS ------------------------------------------------------------------------------------


def transformers_to_openclip(state):
    """The test's own inverse mapping: transformers CLIPModel keys -> OpenCLIP's."""
    out = {}
    names = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    for tower, prefix in (("vision_model", "visual."), ("text_model", "")):
        layers = {k for k in state if k.startswith(f"{tower}.encoder.layers.")}
        count = 1 + max(int(k.split(".")[3]) for k in layers)
        for i in range(count):
            src, dst = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                qkv = [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
                for new, old in names.items():
                    out[f"{dst}{old}.{kind}"] = state[f"{src}{new}.{kind}"]
    v, t = "vision_model.", "text_model."
    out["visual.conv1.weight"] = state[f"{v}embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = state[f"{v}embeddings.class_embedding"]
    out["visual.positional_embedding"] = state[f"{v}embeddings.position_embedding.weight"]
    out["token_embedding.weight"] = state[f"{t}embeddings.token_embedding.weight"]
    out["positional_embedding"] = state[f"{t}embeddings.position_embedding.weight"]
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = state[f"{v}pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = state[f"{v}post_layernorm.{kind}"]
        out[f"ln_final.{kind}"] = state[f"{t}final_layer_norm.{kind}"]
    out["visual.proj"] = state["visual_projection.weight"].T.clone()  # (D, E): x @ proj
    out["text_projection"] = state["text_projection.weight"].T.clone()
    out["logit_scale"] = state["logit_scale"]
    return out


def hps_reference_pixels(pil_images, size):
    """HPSv2's eval transform (hpsv2/src/open_clip/transform.py, `resize_longest_max=True`:
    ToTensor, ResizeMaxSize(size) = bicubic resize of the float tensor so the long side is
    `size` then zero padding to a square, Normalize with OpenAI CLIP's mean/std), written
    here apart from the reward's: numpy for the tensor and the normalisation, a zero canvas for
    the padding, and torch's bicubic interpolation with torchvision's tensor settings
    (align_corners=False, antialias=True, no clamping)."""
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)[:, None, None]
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)[:, None, None]
    out = []
    for image in pil_images:
        chw = np.asarray(image.convert("RGB")).transpose(2, 0, 1).astype(np.float32) / 255
        h, w = chw.shape[1:]
        scale = size / max(h, w)
        nh, nw = round(h * scale), round(w * scale)
        resized = torch.nn.functional.interpolate(
            torch.from_numpy(np.ascontiguousarray(chw))[None],
            size=(nh, nw),
            mode="bicubic",
            align_corners=False,
            antialias=True,
        )[0].numpy()
        canvas = np.zeros((3, size, size), dtype=np.float32)
        top, left = (size - nh) // 2, (size - nw) // 2
        canvas[:, top : top + nh, left : left + nw] = resized
        out.append((canvas - mean) / std)
    return torch.from_numpy(np.stack(out))


def test_hps_pixels_follow_hpsv2_transform():
    from ddpo_lite.rewards.hps import hps_pixels

    rng = np.random.default_rng(3)
    shapes = [(64, 64), (512, 512), (48, 40), (37, 70), (224, 224)]  # (h, w)
    pil = [Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)) for hw in shapes]
    ours = hps_pixels(pil, 224)
    assert ours.shape == (5, 3, 224, 224) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), hps_reference_pixels(pil, 224).numpy(), atol=1e-6)
    # 48 high, 40 wide -> 224 x round(40 * 224 / 48) = 224 x 187, 37 columns of padding:
    # 18 on the left, 19 on the right, black (0) before normalisation
    black = (0 - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array(
        [0.26862954, 0.26130258, 0.27577711]
    )
    for columns in (slice(0, 18), slice(224 - 19, 224)):
        np.testing.assert_allclose(ours[2, :, :, columns].mean(dim=(1, 2)), black, rtol=1e-5)
    assert (ours[2, :, :, 18] != torch.tensor(black, dtype=torch.float32)[:, None]).any()


def test_hps_pixels_match_torchvision():
    """The same transform composed from torchvision, as hpsv2's open_clip does (where torchvision
    is installed; CI does not have it)."""
    tv = pytest.importorskip("torchvision.transforms")
    from torchvision.transforms import functional as TF

    from ddpo_lite.rewards.hps import hps_pixels

    def resize_max_size(x, size=224):  # hpsv2's ResizeMaxSize on a tensor
        h, w = x.shape[1:]
        scale = size / float(max(h, w))
        if scale == 1.0:
            return x
        new = tuple(round(d * scale) for d in (h, w))
        x = TF.resize(x, new, tv.InterpolationMode.BICUBIC)
        ph, pw = size - new[0], size - new[1]
        return TF.pad(x, padding=[pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)

    transform = tv.Compose(
        [
            tv.ToTensor(),
            resize_max_size,
            tv.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    rng = np.random.default_rng(4)
    pil = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in [(64, 64), (512, 512), (300, 200), (97, 131)]
    ]
    expected = torch.stack([transform(image) for image in pil])
    np.testing.assert_allclose(hps_pixels(pil, 224).numpy(), expected.numpy(), atol=1e-6)


def test_hps_converts_openclip_checkpoint(tmp_path):
    from ddpo_lite.rewards.hps import openclip_to_transformers

    processor = tmp_path / "vit-h-config"  # config, tokenizer, image processor; no weights
    save_tiny_clip(processor, projection_dim=20, seed=5, weights=False)
    source = save_tiny_clip(tmp_path / "source", projection_dim=20, seed=7)
    # projection_dim 20 != either width: a missing transpose cannot pass unnoticed
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("position_ids")}
    openclip = transformers_to_openclip(state)
    assert set(openclip_to_transformers(openclip)) == set(state)
    checkpoint = tmp_path / "hps" / "HPS_v2_compressed.pt"
    checkpoint.parent.mkdir()
    torch.save({"state_dict": {f"module.{k}": v for k, v in openclip.items()}}, checkpoint)
    expected = reference_cosine(source, processor, pixels=hps_reference_pixels(images(), 30))
    # CLIP's PIL resize of the 8-bit image (and centre crop) gives other scores
    assert not np.allclose(reference_cosine(source, processor), expected, rtol=1e-3, atol=1e-4)

    def make(batch_size):
        return get_reward(
            "hps",
            model=str(checkpoint.parent),
            version="2",
            processor=str(processor),
            batch_size=batch_size,
        )

    assert_batching(make, expected)
    # one local folder holding the checkpoint and the ViT-H config/tokenizer/processor
    checkpoint.rename(processor / checkpoint.name)
    together = get_reward("hps", model=str(processor), version="2")
    np.testing.assert_allclose(score(together)[0], expected, rtol=1e-4, atol=1e-5)


# --- ImageReward ----------------------------------------------------------------------------


def tiny_blip(seed=11):
    """Random BLIP vision + text encoders with ImageReward's layout, tiny sizes; heads 16 and 12
    (ImageReward's, which the loader assumes)."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    torch.manual_seed(seed)
    vision = BlipVisionModel(
        BlipVisionConfig(
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=16,
            image_size=32,
            patch_size=8,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
            initializer_range=0.02,  # BLIP's default, 1e-10, would leave the image out
        )
    ).eval()
    with torch.no_grad():  # a small residual stream: LayerNorm's eps (1e-6) then matters
        for p in vision.embeddings.parameters():
            p.mul_(0.02)
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=len(WORDS) + 5,
            hidden_size=24,
            encoder_hidden_size=32,
            intermediate_size=36,
            num_hidden_layers=2,
            num_attention_heads=12,
            max_position_embeddings=40,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
        ),
        add_pooling_layer=False,
    ).eval()
    with torch.no_grad():  # likewise for the text embeddings' LayerNorm (eps 1e-12)
        text.embeddings.word_embeddings.weight.mul_(0.01)
        text.embeddings.position_embeddings.weight.mul_(0.01)
    return vision, text


def to_image_reward_checkpoint(vision, text, head):
    """The test's own mapping to the published ImageReward.pt layout (BLIP's timm ViT keys)."""
    out = {}
    blocks = {
        "layer_norm1": "norm1",
        "layer_norm2": "norm2",
        "self_attn.qkv": "attn.qkv",
        "self_attn.projection": "attn.proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    v = vision.state_dict()
    for i in range(vision.config.num_hidden_layers):
        for new, old in blocks.items():
            for kind in ("weight", "bias"):
                out[f"blip.visual_encoder.blocks.{i}.{old}.{kind}"] = v[
                    f"encoder.layers.{i}.{new}.{kind}"
                ]
    out["blip.visual_encoder.cls_token"] = v["embeddings.class_embedding"]
    out["blip.visual_encoder.pos_embed"] = v["embeddings.position_embedding"]
    for kind in ("weight", "bias"):
        out[f"blip.visual_encoder.patch_embed.proj.{kind}"] = v[
            f"embeddings.patch_embedding.{kind}"
        ]
        out[f"blip.visual_encoder.norm.{kind}"] = v[f"post_layernorm.{kind}"]
    for key, value in text.state_dict().items():
        out[f"blip.text_encoder.{key}"] = value
    out["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    out["blip.vision_proj.weight"] = torch.zeros(4, 32)  # parts the reward does not use
    out.update({f"mlp.{k}": v for k, v in head.items()})
    return out


def test_image_reward_matches_blip_forward(tmp_path):
    from transformers import BertTokenizer

    vision, text = tiny_blip()
    head = published_head_state(seed=13, input_size=24)
    (tmp_path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)
    )
    tokenizer = BertTokenizer(vocab_file=str(tmp_path / "vocab.txt"))
    tokenizer.save_pretrained(tmp_path)  # beside ImageReward.pt: the reward finds it there
    torch.save(to_image_reward_checkpoint(vision, text, head), tmp_path / "ImageReward.pt")

    # reference: BLIP's transform as torchvision composes it (resize short side, centre crop)
    # done by transformers' CLIP image processor, then the two encoders and the head by hand
    from transformers import CLIPImageProcessor

    pixels = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)(
        images=images(), return_tensors="pt"
    )["pixel_values"]
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=35, return_tensors="pt")
    with torch.no_grad():
        patches = vision(pixel_values=pixels).last_hidden_state
        hidden = text(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=patches,
        ).last_hidden_state[:, 0]
    expected = (_head_on(hidden, head) - 0.16717362830052426) / 1.0333394966054072

    def make(batch_size):
        return get_reward(
            "image_reward",
            model=str(tmp_path),
            batch_size=batch_size,
        )

    assert_batching(make, expected)
    same_prompt, _ = make(5)(images(), [PROMPTS[0]] * 5, [{}] * 5)
    assert np.ptp(same_prompt) > 1e-3  # the image reaches the score through cross-attention


def test_clip_pixels_follows_torchvision_resize_and_crop():
    from ddpo_lite.rewards._models import CLIP_MEAN, CLIP_STD, clip_pixels

    # 39 wide, 32 high, size 32: no resize; torchvision's CenterCrop takes
    # left = int(round((39 - 32) / 2)) = round(3.5) = 4, so columns 4..35
    array = np.random.default_rng(0).integers(0, 256, (32, 39, 3), dtype=np.uint8)
    pixels = clip_pixels([Image.fromarray(array)], 32)
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == torch.float32
    expected = (array[:, 4:36] / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(pixels[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    # 40 wide, 52 high -> short side 32: 32 x int(32 * 52 / 40) = 32 x 41
    tall = clip_pixels([Image.new("RGB", (40, 52), (255, 0, 0))], 32)
    assert tall.shape == (1, 3, 32, 32)
    red = (np.array([1.0, 0.0, 0.0]) - np.array(CLIP_MEAN)) / np.array(CLIP_STD)  # per channel
    np.testing.assert_allclose(tall[0].mean(dim=(1, 2)).numpy(), red, atol=1e-5)


# --- prompt alignment -----------------------------------------------------------------------


def word_tokenizer(extra=()):
    """A whitespace word-level fast tokenizer over WORDS (and `extra` special tokens)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *extra]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        additional_special_tokens=list(extra),
    )


@pytest.fixture(scope="module")
def bertscore_folder(tmp_path_factory):
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bertscore")
    torch.manual_seed(17)
    model = BertModel(
        BertConfig(
            vocab_size=len(WORDS) + 4,
            hidden_size=16,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=24,
        )
    ).eval()
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder, model


def recall_by_hand(model, tokenizer, candidate, reference, layer):
    """BERTScore recall of one pair, no padding: each reference token (without [CLS]/[SEP])
    takes its best cosine over all candidate tokens; the mean of those."""

    def embed(text):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0]
        return (hidden / hidden.norm(dim=-1, keepdim=True)).numpy()

    ref, cand = embed(reference)[1:-1], embed(candidate)
    return float(np.mean([max(float(r @ c) for c in cand) for r in ref]))


def test_bertscore_recall_matches_by_hand(bertscore_folder):
    from transformers import AutoTokenizer

    from ddpo_lite.rewards.alignment import bertscore_recall, load_bertscore

    folder, model = bertscore_folder
    scorer, tokenizer, layer = load_bertscore(str(folder), 2)
    assert layer == 2
    candidates = ["a cat", "red dog and a red cat on the image", "dog"]
    references = ["the image contains a red cat", "the image contains a dog", "a dog"]
    with torch.no_grad():
        recall = bertscore_recall(scorer, tokenizer, candidates, references, layer, "cpu")
        same = bertscore_recall(scorer, tokenizer, ["a red cat"], ["a red cat"], layer, "cpu")
    hand = AutoTokenizer.from_pretrained(folder)
    expected = [
        recall_by_hand(model, hand, c, r, 2) for c, r in zip(candidates, references, strict=True)
    ]
    np.testing.assert_allclose(recall.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(same.numpy(), [1.0], rtol=1e-5)  # every token finds itself
    with pytest.raises(ValueError, match="outside"):
        load_bertscore(str(folder), 4)


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    """A tiny LLaVA-1.5 (CLIP vision tower + Llama) with a word-level tokenizer and a chat
    template of LLaVA-1.5's shape."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    folder = tmp_path_factory.mktemp("llava")
    tokenizer = word_tokenizer(extra=["<image>", "USER:", "ASSISTANT:"])
    tokenizer.chat_template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:"
    )
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=24,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=0,
            eos_token_id=3,
            bos_token_id=2,
        ),
        image_token_index=image_token,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(19)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}
        ),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's [CLS], dropped by the "default" strategy
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(folder)
    return folder, model, processor


def test_prompt_alignment_end_to_end(llava_folder, bertscore_folder):
    from transformers import AutoTokenizer

    folder, llava, processor = llava_folder
    bert_folder, bert = bertscore_folder

    # reference answers: one image at a time, greedy, built without the reward's code
    answers = []
    text = "USER: <image> Answer concisely: what is going on in this image? ASSISTANT:"
    for image in images():
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        with torch.no_grad():
            out = llava.generate(**inputs, max_new_tokens=6, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        answers.append(processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    hand = AutoTokenizer.from_pretrained(bert_folder)
    expected = [
        recall_by_hand(bert, hand, a, f"The image contains {p}", 3)
        for a, p in zip(answers, PROMPTS, strict=True)
    ]

    def make(batch_size):
        return get_reward(
            "prompt_alignment",
            model=str(folder),
            bertscore_model=str(bert_folder),
            bertscore_layer=3,  # a 3-layer BERT: bert-score has no layer for it
            max_new_tokens=6,
            batch_size=batch_size,
        )

    reward = make(2)
    rewards, info = score(reward)
    assert info["answer"] == answers
    assert any(answers)  # the tiny model says something: the recall is not of empty strings
    np.testing.assert_allclose(rewards, expected, rtol=1e-4)
    assert_batching(make, expected)


def test_prompt_alignment_ddpo_template(llava_folder, bertscore_folder):
    """template="ddpo": the question inside the DDPO LLaVA server's v0 conversation."""
    from transformers import AutoTokenizer

    folder, llava, processor = llava_folder
    bert_folder, bert = bertscore_folder
    text = (  # kvablack/LLaVA-server: simple_conv_multimodal.get_prompt() + "Human: " + ...
        "You are LLaVA, a large language and vision assistant trained by UW Madison WAIV Lab."
        "You are able to understand the visual content that the user provides, and assist the "
        "user with a variety of tasks using natural language.Follow the instructions carefully "
        "and explain your answers in detail.###Human: Hi!###Assistant: Hi there!  How can I "
        "help you today?\n###Human: <image> Answer concisely: what is going on in this image?###"
    )
    answers = []
    for image in images(2):
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        with torch.no_grad():
            out = llava.generate(**inputs, max_new_tokens=6, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        answers.append(processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    hand = AutoTokenizer.from_pretrained(bert_folder)
    expected = [
        recall_by_hand(bert, hand, a, f"The image contains {p}", 3)
        for a, p in zip(answers, PROMPTS[:2], strict=True)
    ]
    reward = get_reward(
        "prompt_alignment",
        model=str(folder),
        bertscore_model=str(bert_folder),
        bertscore_layer=3,
        max_new_tokens=6,
        template="ddpo",
    )
    rewards, info = score(reward, n=2)
    assert info["answer"] == answers and any(answers)
    np.testing.assert_allclose(rewards, expected, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown template 'v0'"):
        get_reward("prompt_alignment", model=str(folder), template="v0")


def test_ddpo_v0_answer_cleaning():
    from ddpo_lite.rewards.alignment import ddpo_v0_answer

    # the server stops at the first "#" and keeps what follows "Assistant:"
    assert ddpo_v0_answer("Assistant: A cat on a mat.###Human: what") == "A cat on a mat."
    assert ddpo_v0_answer(" a dog ## b") == "a dog"
    assert ddpo_v0_answer("a dog") == "a dog"


def save_tiny_deberta(folder, num_layers):
    """A random DeBERTa of deberta-xlarge-mnli's model_type and depth (or another), tiny widths,
    saved as a local folder with a word-level tokenizer."""
    from transformers import DebertaConfig, DebertaModel

    torch.manual_seed(23)
    config = DebertaConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=8,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=32,
        relative_attention=True,
        pos_att_type=["c2p", "p2c"],
        type_vocab_size=0,
        id2label={0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"},
    )
    model = DebertaModel(config).eval()
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return model


def test_bertscore_layer_from_the_model_not_its_name(tmp_path):
    from transformers import AutoTokenizer

    from ddpo_lite.rewards.alignment import bertscore_layer_for, bertscore_recall, load_bertscore

    folder = tmp_path / "my-copy-of-deberta"  # a local folder: no hub name to go by
    model = save_tiny_deberta(folder, 48)
    scorer, tokenizer, layer = load_bertscore(str(folder), None)
    assert layer == 40  # bert-score's layer for microsoft/deberta-xlarge-mnli (48 layers)
    with torch.no_grad():
        recall = bertscore_recall(scorer, tokenizer, ["a red dog"], ["a red cat"], layer, "cpu")
    hand = AutoTokenizer.from_pretrained(folder)
    expected = recall_by_hand(model, hand, "a red dog", "a red cat", 40)
    assert expected != pytest.approx(recall_by_hand(model, hand, "a red dog", "a red cat", 48))
    np.testing.assert_allclose(recall.numpy(), [expected], rtol=1e-5)
    assert load_bertscore(str(folder), 12)[2] == 12  # named: as named
    # bert-score's table by hub name, for the models of the same shapes read at other layers
    assert bertscore_layer_for(scorer.config, "microsoft/deberta-xlarge") == 18
    assert bertscore_layer_for(scorer.config, "microsoft/deberta-xlarge-mnli") == 40
    save_tiny_deberta(tmp_path / "deberta-24", 24)
    assert load_bertscore(str(tmp_path / "deberta-24"), None)[2] == 18  # deberta-large-mnli's
    save_tiny_deberta(tmp_path / "deberta-5", 5)
    with pytest.raises(
        ValueError, match="no BERTScore layer.*'deberta', 5 layers.*bertscore_layer"
    ):
        load_bertscore(str(tmp_path / "deberta-5"), None)


def test_image_processors_are_pil_even_with_torchvision(monkeypatch, clip_folder, llava_folder):
    """transformers picks torchvision's image processor when torchvision is installed; the
    rewards pin PIL's. Torchvision's presence is simulated where transformers decides it."""
    from transformers import AutoImageProcessor
    from transformers.models.auto import image_processing_auto as auto

    from ddpo_lite.rewards import _models

    chosen = []
    resolve = auto._resolve_backend

    def spy(*args, **kwargs):
        chosen.append(resolve(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(auto, "is_torchvision_available", lambda: True)
    monkeypatch.setattr(auto, "_resolve_backend", spy)
    AutoImageProcessor.from_pretrained(clip_folder[0])  # what transformers would choose
    assert chosen == ["torchvision"]  # the simulation works: unpinned, torchvision's
    for folder in (clip_folder[0], llava_folder[0]):
        processor = _models.pil_image_processor(str(folder))
        assert chosen[-1] == "pil" and _models.is_pil_image_processor(processor)
    assert type(processor).__name__ in ("CLIPImageProcessorPil", "CLIPImageProcessor")


def _image_processors(reward):
    """The image processors a reward's scoring function holds (directly or in a processor)."""
    found = []
    for cell in reward.score.__closure__ or ():
        value = cell.cell_contents
        for obj in (value, getattr(value, "image_processor", None)):
            if type(obj).__name__.endswith(("ImageProcessor", "ImageProcessorPil")):
                found.append(obj)
    return found


def test_rewards_use_pil_image_processors(
    aesthetic_files, clip_folder, llava_folder, bertscore_folder
):
    """Each reward's image processor is PIL's, torchvision installed or not."""
    from ddpo_lite.rewards import _models

    rewards = [
        get_reward(
            "aesthetic", model=str(aesthetic_files[0] / "clip"), head=str(aesthetic_files[0])
        ),
        get_reward("clip_score", model=str(clip_folder[0])),
        get_reward("pickscore", model=str(clip_folder[0])),
        get_reward(
            "prompt_alignment",
            model=str(llava_folder[0]),
            bertscore_model=str(bertscore_folder[0]),
            bertscore_layer=3,
        ),
    ]
    for reward in rewards:
        processors = _image_processors(reward)
        assert processors and all(_models.is_pil_image_processor(p) for p in processors), (
            reward.name
        )


def test_missing_model_says_what_to_pass(tmp_path):
    from ddpo_lite.rewards._models import RewardModelError

    # HF_HUB_OFFLINE=1 (conftest): a default that is not in the cache, a folder that is not there
    with pytest.raises(RewardModelError, match="xswu/HPSv2.*local file or folder"):
        get_reward("hps")
    with pytest.raises(RewardModelError, match="nowhere.*local folder"):
        get_reward("clip_score", model=str(tmp_path / "nowhere"))
    with pytest.raises(RewardModelError, match="'ImageReward.pt' not found in the folder"):
        get_reward("image_reward", model=str(tmp_path))
