"""ImageReward v1.0 (Xu et al. 2023): BLIP (ViT-L/16 image encoder, BERT-base text encoder with
cross-attention to the image) and an MLP head, trained on human preference rankings.

score = (MLP(h_CLS) - 0.16717362830052426) / 1.0333394966054072, h_CLS the text encoder's first
hidden state for the prompt (BERT tokenizer, padded/truncated to 35 tokens) attending to the
image's patch tokens; the MLP is 768-1024-128-64-16-1 with dropouts 0.2, 0.2, 0.1 and no
activations (as published, like the aesthetic head). Images: bicubic resize of the short side to
224, centre crop, CLIP normalisation.

The published `ImageReward.pt` (hub repo `THUDM/ImageReward`) holds BLIP's own modules (a
timm-style ViT, a BERT from BLIP's med.py) and the MLP. Rather than depend on the
`image-reward` package (which pins timm 0.6 and fairscale and breaks on recent transformers),
its weights are loaded into transformers' BlipVisionModel and BlipTextModel, which are ports of
the same modules: the vision keys are renamed (`blocks.N.attn.qkv` -> `encoder.layers.N.
self_attn.qkv`, ...), the text keys load as they are. The sizes are read from the checkpoint;
head counts (not recoverable from weights) default to ViT-L's 16 and BERT-base's 12.
"""

from __future__ import annotations

from ddpo_lite.rewards import _models
from ddpo_lite.rewards.aesthetic import aesthetic_head
from ddpo_lite.rewards.registry import register_reward

DEFAULT_REPO = "THUDM/ImageReward"
CHECKPOINT = "ImageReward.pt"
DEFAULT_TOKENIZER = "google-bert/bert-base-uncased"
MEAN, STD = 0.16717362830052426, 1.0333394966054072
TEXT_LENGTH = 35

_VISION_RENAMES = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def blip_vit_to_transformers(state: dict) -> dict:
    """BLIP's timm-style ViT state dict -> transformers BlipVisionModel keys."""
    out = {}
    for key, value in state.items():
        if key in _VISION_RENAMES:
            out[_VISION_RENAMES[key]] = value
        elif key.startswith("blocks."):
            _, index, name = key.split(".", 2)
            module, _, param = name.rpartition(".")
            if module not in _BLOCK:
                raise _models.RewardModelError(f"ImageReward checkpoint: unexpected key {key!r}")
            out[f"encoder.layers.{index}.{_BLOCK[module]}.{param}"] = value
        else:
            raise _models.RewardModelError(f"ImageReward checkpoint: unexpected key {key!r}")
    return out


def _under(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _count(state: dict, prefix: str) -> int:
    return 1 + max(int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix))


def build_blip(vision: dict, text: dict, vision_heads: int, text_heads: int):
    """BlipVisionModel and BlipTextModel sized from the converted state dicts."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    grid = round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    vision_config = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(vision, "encoder.layers."),
        num_attention_heads=vision_heads,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # timm ViT's LayerNorm eps in BLIP
    )
    words = text["embeddings.word_embeddings.weight"]
    text_config = BlipTextConfig(
        vocab_size=words.shape[0],
        hidden_size=words.shape[1],
        encoder_hidden_size=text["encoder.layer.0.crossattention.self.key.weight"].shape[1],
        intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=_count(text, "encoder.layer."),
        num_attention_heads=text_heads,
        max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
        hidden_act="gelu",
        layer_norm_eps=1e-12,
    )
    return BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False)


def load_image_reward(source: str, vision_heads: int = 16, text_heads: int = 12):
    """(vision encoder, text encoder, MLP head) from an ImageReward checkpoint."""
    path = _models.resolve_file(source, CHECKPOINT)
    state = _models.load_state_dict(path)
    vision_state = blip_vit_to_transformers(_under(state, "blip.visual_encoder."))
    text_state = _under(state, "blip.text_encoder.")
    head_state = _under(state, "mlp.layers.")
    if not vision_state or not text_state or not head_state:
        raise _models.RewardModelError(
            f"{str(path)!r} is not an ImageReward checkpoint (expected blip.visual_encoder.*, "
            "blip.text_encoder.* and mlp.layers.* keys)"
        )
    vision, text = build_blip(vision_state, text_state, vision_heads, text_heads)
    what = f"ImageReward checkpoint {str(path)!r}"
    _models.load_exact(vision, vision_state, what)
    _models.load_exact(text, text_state, what, ignore=lambda k: k.endswith("position_ids"))
    head = aesthetic_head(text.config.hidden_size)
    _models.load_exact(head, head_state, what)
    return vision, text, head


@register_reward("image_reward", "ImageReward v1.0 (BLIP + MLP), standardised human preference")
def image_reward(
    device: str = "cpu",
    model: str | None = None,
    offload: bool = False,
    tokenizer: str | None = None,
    batch_size: int = 16,
    dtype: str | None = None,
):
    """`model`: `ImageReward.pt` (file, folder holding it, or hub repo); `tokenizer`: the BERT
    tokenizer (default: the `model` folder when it holds a vocab.txt, else bert-base-uncased)."""
    import torch
    from transformers import BertTokenizer

    vision, text, head = load_image_reward(model or DEFAULT_REPO)
    tokenizer = tokenizer or _models.beside(model, ["vocab.txt"], DEFAULT_TOKENIZER)
    bert_tokenizer = _models.from_pretrained(BertTokenizer, tokenizer)
    size = vision.config.image_size
    torch_dtype = _models.resolve_dtype(device, dtype)

    def score(images, prompts, metadata):
        pixels = _models.clip_pixels(images, size).to(device, torch_dtype)  # (b, 3, 224, 224)
        image_embeds = vision(pixel_values=pixels).last_hidden_state  # (b, 1 + patches, 1024)
        tokens = bert_tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=TEXT_LENGTH,
            return_tensors="pt",
        )
        hidden = text(
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(
                image_embeds.shape[:2], dtype=torch.long, device=device
            ),
        ).last_hidden_state  # (b, 35, 768)
        raw = head(hidden[:, 0]).squeeze(-1)
        return (raw - MEAN) / STD, {}

    return _models.BatchedReward(
        "image_reward", score, [vision, text, head], device, torch_dtype, offload, batch_size
    )
