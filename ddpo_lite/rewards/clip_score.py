"""CLIPScore (Hessel et al. 2021) with a transformers CLIP model.

score = scale * max(cos(E_image, E_text), 0), the CLIP image and text embeddings
(`get_image_features`, `get_text_features`). The default scale, 100, and the default model,
`openai/clip-vit-large-patch14`, are torchmetrics' (the paper's own figure uses ViT-B/32 and a
scale of 2.5: pass `model="openai/clip-vit-base-patch32", scale=2.5`). Prompts longer than the
text encoder's context (77 tokens) are truncated.

`clip_similarity` is shared with PickScore and HPS, which are CLIP models with other weights.
"""

from __future__ import annotations

from ddpo_lite.rewards import _models
from ddpo_lite.rewards.registry import register_reward

DEFAULT_MODEL = "openai/clip-vit-large-patch14"


def clip_similarity(model, tokenizer, pixels, prompts, device, dtype):
    """cos(E_image, E_text) for each (image, prompt) pair -> (b,), with `pixels` the images
    as the model's preprocessing made them (b, 3, S, S) and `tokenizer` the model's."""
    text = tokenizer(
        list(prompts),
        padding=True,
        truncation=True,
        max_length=model.config.text_config.max_position_embeddings,
        return_tensors="pt",
    )
    image_embeds = _models.features(model.get_image_features(pixel_values=pixels.to(device, dtype)))
    text_embeds = _models.features(
        model.get_text_features(
            input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device)
        )
    )
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)  # (b, E)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)  # (b, E)
    return (image_embeds * text_embeds).sum(dim=-1)  # (b,)


def load_clip(source: str, processor_source: str | None = None):
    """A transformers CLIPModel, its tokenizer and its image processor (PIL backend) from
    `processor_source` (default: the model's own folder or repo)."""
    from transformers import AutoTokenizer, CLIPModel

    model = _models.from_pretrained(CLIPModel, source)
    tokenizer = _models.from_pretrained(AutoTokenizer, processor_source or source)
    image_processor = _models.pil_image_processor(processor_source or source)
    return model, tokenizer, image_processor


def clip_pixels(image_processor, images):
    """The images through a CLIP image processor -> (b, 3, S, S)."""
    return image_processor(images=list(images), return_tensors="pt")["pixel_values"]


@register_reward("clip_score", "CLIPScore: 100 * max(cos(image, prompt), 0), CLIP ViT-L/14")
def clip_score(
    device: str = "cpu",
    model: str | None = None,
    offload: bool = False,
    scale: float = 100.0,
    batch_size: int = 16,
    dtype: str | None = None,
):
    clip, tokenizer, image_processor = load_clip(model or DEFAULT_MODEL)
    torch_dtype = _models.resolve_dtype(device, dtype)

    def score(images, prompts, metadata):
        pixels = clip_pixels(image_processor, images)
        cosine = clip_similarity(clip, tokenizer, pixels, prompts, device, torch_dtype)
        return scale * cosine.clamp(min=0), {"clip_cosine": cosine}

    return _models.BatchedReward(
        "clip_score", score, [clip], device, torch_dtype, offload, batch_size
    )
