"""PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

score = exp(logit_scale) * cos(E_image, E_text), as the PickScore authors compute it (about
20-23 for typical images; the model's logit_scale is about 100). Model
`yuvalkirstain/PickScore_v1` is a plain transformers CLIPModel; its processor is
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`'s (a local model folder that holds its own processor
files is used with them).
"""

from __future__ import annotations

from ddpo_lite.rewards import _models
from ddpo_lite.rewards.clip_score import clip_pixels, clip_similarity, load_clip
from ddpo_lite.rewards.registry import register_reward

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


@register_reward("pickscore", "PickScore v1: logit_scale * cos(image, prompt), CLIP ViT-H/14")
def pickscore(
    device: str = "cpu",
    model: str | None = None,
    offload: bool = False,
    processor: str | None = None,
    batch_size: int = 16,
    dtype: str | None = None,
):
    source = model or DEFAULT_MODEL
    processor = processor or _models.beside(model, PROCESSOR_FILES, DEFAULT_PROCESSOR)
    clip, tokenizer, image_processor = load_clip(source, processor)
    torch_dtype = _models.resolve_dtype(device, dtype)

    def score(images, prompts, metadata):
        pixels = clip_pixels(image_processor, images)
        cosine = clip_similarity(clip, tokenizer, pixels, prompts, device, torch_dtype)
        return clip.logit_scale.exp() * cosine, {"pickscore_cosine": cosine}

    return _models.BatchedReward(
        "pickscore", score, [clip], device, torch_dtype, offload, batch_size
    )
