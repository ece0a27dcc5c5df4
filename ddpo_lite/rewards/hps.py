"""HPS v2 / v2.1 (Wu et al. 2023): Human Preference Score, an OpenCLIP ViT-H/14 fine-tuned on
human preferences.

score = cos(E_image, E_text) with no logit scale, as HPSv2's own `score` computes it
(`image_features @ text_features.T`, diagonal; about 0.2-0.35 for typical images).

The published checkpoints (`HPS_v2.1_compressed.pt`, `HPS_v2_compressed.pt` in the hub repo
`xswu/HPSv2`) are OpenCLIP state dicts. Rather than depend on the `hpsv2` package (which pins
old packages and downloads at import), the weights are converted key for key into a
transformers CLIPModel built from `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`'s config (the same
ViT-H/14 architecture: GELU, pre-LN, causal text encoder pooled at the end-of-text token), whose
tokenizer is also used. OpenCLIP's packed attention projection
`in_proj_weight` (3D, D) is split into q, k, v; `proj`/`text_projection` (D, E) are applied as
`x @ proj`, so they are transposed into nn.Linear weights (E, D).

Preprocessing, as `hpsv2.score` builds it (its bundled open_clip's `image_transform(224,
is_train=False, resize_longest_max=True)`): the image becomes a float tensor in [0, 1] first,
and that tensor is resized (bicubic), zero-padded to a square and normalised with CLIP's mean and
std. Resizing the 8-bit image with PIL instead, as CLIP's image processor does, filters
otherwise and rounds to 8 bits: up to 7e-3 relative difference in the score at 64 px.
`hps_pixels` writes the reference's steps with torch ops (no torchvision needed). For square
images (what the trainer produces) nothing is padded, and the transform equals open_clip's
plain `Resize(224, bicubic)` + `CenterCrop(224)` of a tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from ddpo_lite.rewards import _models
from ddpo_lite.rewards.clip_score import clip_similarity
from ddpo_lite.rewards.registry import register_reward

DEFAULT_REPO = "xswu/HPSv2"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
FILES = {"2.1": "HPS_v2.1_compressed.pt", "2": "HPS_v2_compressed.pt"}

# OpenCLIP name -> transformers CLIP name, inside one residual block
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def _convert_tower(state: dict, prefix: str, target: str) -> dict:
    """The residual blocks `{prefix}transformer.resblocks.N.*` -> `{target}.encoder.layers.N.*`."""
    out = {}
    blocks = f"{prefix}transformer.resblocks."
    for key, value in state.items():
        if not key.startswith(blocks):
            continue
        index, _, name = key[len(blocks) :].partition(".")
        layer = f"{target}.encoder.layers.{index}."
        if name.startswith("attn.in_proj_"):  # packed (3D, D) / (3D,) -> q, k, v
            kind = name.removeprefix("attn.in_proj_")
            for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[f"{layer}self_attn.{part}_proj.{kind}"] = chunk
            continue
        module, _, param = name.rpartition(".")
        if module not in _BLOCK:
            raise _models.RewardModelError(f"HPS checkpoint: unexpected key {key!r}")
        out[f"{layer}{_BLOCK[module]}.{param}"] = value
    return out


def openclip_to_transformers(state: dict) -> dict:
    """An OpenCLIP ViT (non-custom text tower) state dict -> transformers CLIPModel keys."""
    out = _convert_tower(state, "visual.", "vision_model")
    out.update(_convert_tower(state, "", "text_model"))
    renames = {
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
    }
    renames = {old: new for old, new in renames.items() if old in state}  # absent: missing
    out.update({new: state[old] for old, new in renames.items()})
    for old, new in (("visual.proj", "visual_projection"), ("text_projection", "text_projection")):
        if old in state:  # applied as x @ proj (D, E): an nn.Linear weight is (E, D)
            out[f"{new}.weight"] = state[old].t().contiguous()
    return out


def hps_pixels(images: Sequence[Image.Image], size: int):
    """HPSv2's image transform -> float tensor (B, 3, size, size). Each step as torchvision does
    it (checked against torchvision in tests/test_rewards_models.py where it is installed):

    1. ToTensor: RGB uint8 (H, W, 3) -> float32 (3, H, W) / 255.
    2. ResizeMaxSize: scale = size / max(H, W); (h, w) = (round(H * scale), round(W * scale)),
       Python's round. torchvision's resize of a float tensor is `interpolate(bicubic,
       align_corners=False, antialias=True)` (antialias is its default since 0.17) with no
       clamping, and nothing when the size does not change.
    3. Pad with 0 (black, before normalisation) to (size, size): pad_w // 2 on the left,
       pad_h // 2 on top, the rest right and bottom. (HPSv2 skips 2-3 when scale is 1, which
       leaves a non-square image the ViT cannot take; here it is padded.)
    4. Normalise with OpenAI CLIP's mean and std.
    """
    import torch
    import torch.nn.functional as F

    out = []
    for image in images:
        array = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255  # (3, H, W)
        height, width = x.shape[1:]
        scale = size / float(max(height, width))
        new_h, new_w = round(height * scale), round(width * scale)
        if (new_h, new_w) != (height, width):
            x = F.interpolate(
                x[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
            )[0]
        pad_h, pad_w = size - new_h, size - new_w
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
        out.append(x)
    pixels = torch.stack(out)  # (B, 3, size, size)
    mean = torch.tensor(_models.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_models.CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def load_hps(checkpoint: str, processor_source: str):
    """A transformers CLIPModel holding the HPS weights, and the ViT-H/14 tokenizer."""
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    config = _models.from_pretrained(CLIPConfig, processor_source)
    tokenizer = _models.from_pretrained(AutoTokenizer, processor_source)
    state = openclip_to_transformers(_models.load_state_dict(checkpoint))
    with init_empty_weights():  # parameters on the meta device until the checkpoint's arrive
        model = CLIPModel(config)
    what = f"HPS checkpoint {str(checkpoint)!r} (architecture of {processor_source!r})"
    _models.load_exact(model, state, what, assign=True)
    return model, tokenizer


@register_reward("hps", "HPS v2.1 human preference score: cos(image, prompt), OpenCLIP ViT-H/14")
def hps(
    device: str = "cpu",
    model: str | None = None,
    offload: bool = False,
    version: str = "2.1",
    processor: str | None = None,
    batch_size: int = 16,
    dtype: str | None = None,
):
    """`model`: the OpenCLIP checkpoint (file, folder holding it, or hub repo); `version`:
    "2.1" or "2" picks the file; `processor`: the config and tokenizer source (default: the
    `model` folder when it holds a config.json, else the laion ViT-H/14 repo). The images are
    prepared by `hps_pixels` at the config's image size (224)."""
    if version not in FILES:
        raise ValueError(f"unknown HPS version {version!r}; expected one of {sorted(FILES)}")
    checkpoint = _models.resolve_file(model or DEFAULT_REPO, FILES[version])
    processor = processor or _models.beside(model, ["config.json"], DEFAULT_PROCESSOR)
    clip, tokenizer = load_hps(checkpoint, processor)
    size = clip.config.vision_config.image_size
    torch_dtype = _models.resolve_dtype(device, dtype)

    def score(images, prompts, metadata):
        pixels = hps_pixels(images, size)  # (b, 3, 224, 224)
        cosine = clip_similarity(clip, tokenizer, pixels, prompts, device, torch_dtype)
        return cosine, {}

    return _models.BatchedReward("hps", score, [clip], device, torch_dtype, offload, batch_size)
