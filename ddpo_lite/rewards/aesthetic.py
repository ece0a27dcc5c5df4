"""The DDPO paper's aesthetic reward: the LAION aesthetic predictor v2.

score = MLP(e / |e|), e = CLIP ViT-L/14 image embedding (`get_image_features`, 768-d).
The MLP is reproduced as published: Linear 768-1024, Dropout 0.2, Linear 1024-128, Dropout 0.2,
Linear 128-64, Dropout 0.1, Linear 64-16, Linear 16-1 -- no activation between the linear
layers (so the head is one affine map in eval mode; it is kept as published so that its state
dict keys `layers.0/2/4/6/7.*` load as they are). Scores are on the predictor's 1-10 scale.

Defaults, as TRL and ddpo-pytorch get them: CLIP `openai/clip-vit-large-patch14`, head
`aesthetic-model.pth` from the hub repo `trl-lib/ddpo-aesthetic-predictor`.

    ddpo-lite train --preset aesthetic          # reward.name = "aesthetic"
"""

from __future__ import annotations

from ddpo_lite.rewards import _models
from ddpo_lite.rewards.registry import register_reward

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_HEAD = "trl-lib/ddpo-aesthetic-predictor"
HEAD_FILE = "aesthetic-model.pth"
HEAD_FILES = (HEAD_FILE, "aesthetic-model.safetensors")


def aesthetic_head(input_size: int = 768):
    """The published MLP, layer for layer (indices match the published state dict)."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(input_size, 1024),  # layers.0
        nn.Dropout(0.2),
        nn.Linear(1024, 128),  # layers.2
        nn.Dropout(0.2),
        nn.Linear(128, 64),  # layers.4
        nn.Dropout(0.1),
        nn.Linear(64, 16),  # layers.6
        nn.Linear(16, 1),  # layers.7
    )


def load_head(source: str, input_size: int):
    """The head from a .pth/.safetensors file, a folder holding `aesthetic-model.pth` (or
    `aesthetic-model.safetensors`), or a hub repo."""
    from pathlib import Path

    folder = Path(source).expanduser()
    filename = HEAD_FILE
    if folder.is_dir() and (folder / HEAD_FILES[1]).is_file():
        filename = HEAD_FILES[1]
    path = _models.resolve_file(source, filename)
    state = _models.load_state_dict(path)
    # the published file is the MLP module's state dict: keys "layers.N.*"
    state = {k.removeprefix("layers."): v for k, v in state.items()}
    head = aesthetic_head(input_size)
    _models.load_exact(head, state, f"aesthetic head {str(path)!r}")
    return head


@register_reward("aesthetic", "LAION aesthetic predictor v2 on CLIP ViT-L/14 (1-10 scale)")
def aesthetic(
    device: str = "cpu",
    model: str | None = None,
    offload: bool = False,
    head: str | None = None,
    batch_size: int = 16,
    dtype: str | None = None,
):
    """`model`: the CLIP (hub id or folder); `head`: the MLP (file, folder or hub repo; default:
    the `model` folder when it holds aesthetic-model.pth/.safetensors, else the TRL repo)."""
    from transformers import CLIPConfig, CLIPVisionModelWithProjection

    source = model or DEFAULT_CLIP
    # the vision tower alone (the text tower is not needed); its projection size is the full
    # config's (a vision config of its own may carry a stale default)
    config = _models.from_pretrained(CLIPConfig, source)
    config.vision_config.projection_dim = config.projection_dim
    clip = _models.from_pretrained(
        CLIPVisionModelWithProjection, source, config=config.vision_config
    )
    processor = _models.pil_image_processor(source)
    head = head or _models.beside(model, HEAD_FILES, DEFAULT_HEAD)
    mlp = load_head(head, clip.config.projection_dim)
    torch_dtype = _models.resolve_dtype(device, dtype)

    def score(images, prompts, metadata):
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        embeds = clip(pixel_values=pixels.to(device, torch_dtype)).image_embeds  # (b, 768)
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)  # unit length
        return mlp(embeds).squeeze(-1), {}

    return _models.BatchedReward(
        "aesthetic", score, [clip, mlp], device, torch_dtype, offload, batch_size
    )
