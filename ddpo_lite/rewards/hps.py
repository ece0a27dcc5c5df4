"""HPS v2 / v2.1 (Wu et al. 2023): Human Preference Score, an OpenCLIP ViT-H/14 fine-tuned on
human preferences.

score = cos(E_image, E_text) with no logit scale, as HPSv2's own `score` computes it
(`image_features @ text_features.T`, diagonal; about 0.2-0.35 for typical images).

The published checkpoints (`HPS_v2.1_compressed.pt`, `HPS_v2_compressed.pt` in the hub repo
`xswu/HPSv2`) are OpenCLIP state dicts. Rather than depend on the `hpsv2` package (which pins
old packages and downloads at import), the weights are converted key for key into a
transformers CLIPModel built from `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`'s config (the same
ViT-H/14 architecture: GELU, pre-LN, causal text encoder pooled at the end-of-text token), whose
tokenizer and image processor are also used. OpenCLIP's packed attention projection
`in_proj_weight` (3D, D) is split into q, k, v; `proj`/`text_projection` (D, E) are applied as
`x @ proj`, so they are transposed into nn.Linear weights (E, D).

Preprocessing: resize the short side to 224 (bicubic) and centre-crop, CLIP normalisation. HPSv2
pads non-square images to a square instead of cropping them; for square images (what the
trainer produces) the two are the same.
"""

from __future__ import annotations

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


def load_hps(checkpoint: str, processor_source: str):
    """A transformers CLIPModel holding the HPS weights, and the ViT-H/14 CLIPProcessor."""
    from accelerate import init_empty_weights
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    config = _models.from_pretrained(CLIPConfig, processor_source)
    processor = _models.from_pretrained(CLIPProcessor, processor_source)
    state = openclip_to_transformers(_models.load_state_dict(checkpoint))
    with init_empty_weights():  # parameters on the meta device until the checkpoint's arrive
        model = CLIPModel(config)
    what = f"HPS checkpoint {str(checkpoint)!r} (architecture of {processor_source!r})"
    _models.load_exact(model, state, what, assign=True)
    return model, processor


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
    "2.1" or "2" picks the file; `processor`: config, tokenizer and image processor source
    (default: the `model` folder when it holds a config.json, else the laion ViT-H/14 repo)."""
    if version not in FILES:
        raise ValueError(f"unknown HPS version {version!r}; expected one of {sorted(FILES)}")
    checkpoint = _models.resolve_file(model or DEFAULT_REPO, FILES[version])
    processor = processor or _models.beside(model, ["config.json"], DEFAULT_PROCESSOR)
    clip, clip_processor = load_hps(checkpoint, processor)
    torch_dtype = _models.resolve_dtype(device, dtype)

    def score(images, prompts, metadata):
        cosine = clip_similarity(clip, clip_processor, images, prompts, device, torch_dtype)
        return cosine, {}

    return _models.BatchedReward("hps", score, [clip], device, torch_dtype, offload, batch_size)
