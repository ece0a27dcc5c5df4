"""SDXL and CLIP ViT-H/14 from their published configs (`ddpo_lite.bench.sdxl`), on meta.

The parameter counts are the released checkpoints' (stabilityai/stable-diffusion-xl-base-1.0's
unet, vae, text_encoder, text_encoder_2; laion/CLIP-ViT-H-14-laion2B-s32B-b79K's vision tower with
its projection, as IP-Adapter's and IDM-VTON's image_encoder): a config written out wrongly
shows up here.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from ddpo_lite.bench.sdxl import (
    SDXL_RANDOM,
    build_clip_vision_h,
    build_sdxl_pipeline,
)

PUBLISHED = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}
CLIP_VIT_H14_VISION_PARAMS = 632_076_800


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def pipe():
    return build_sdxl_pipeline(device="meta")


def test_model_name():
    assert SDXL_RANDOM == "sdxl-random"


@pytest.mark.parametrize("component", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_ones(pipe, component):
    count = n_params(getattr(pipe, component))
    assert count == pytest.approx(PUBLISHED[component], rel=0.005)


def test_clip_vision_h_has_the_published_size():
    vision = build_clip_vision_h()
    assert vision.device.type == "meta"
    assert n_params(vision) == pytest.approx(CLIP_VIT_H14_VISION_PARAMS, rel=0.005)
    assert vision.config.projection_dim == 1024
    assert vision.config.hidden_size == 1280


def test_pipeline_is_sdxl_on_meta(pipe):
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.vae_scale_factor == 8
    assert pipe.config.force_zeros_for_empty_prompt
    for model in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        assert all(p.device.type == "meta" for p in model.parameters())
    assert pipe.tokenizer is not None and pipe.tokenizer_2 is not None


def test_shapes_that_encode_prompt_feeds(pipe):
    unet = pipe.unet
    # text_embeds (text_encoder_2's projection, 1280) + 6 time ids x addition_time_embed_dim 256
    assert unet.add_embedding.linear_1.in_features == 2816
    assert unet.config.cross_attention_dim == 2048
    assert (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        == unet.config.cross_attention_dim
    )
    assert pipe.text_encoder_2.config.projection_dim == 1280
    assert pipe.text_encoder_2.text_projection.out_features == 1280
    assert unet.config.addition_time_embed_dim == 256
    assert unet.config.sample_size == 128


def test_vae_upcasts_and_scales(pipe):
    assert pipe.vae.config.force_upcast is True
    assert pipe.vae.config.scaling_factor == 0.13025


def test_scheduler_is_ddim_with_sdxls_schedule(pipe):
    scheduler = pipe.scheduler
    assert isinstance(scheduler, DDIMScheduler)
    config = scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == (
        "scaled_linear",
        0.00085,
        0.012,
    )
    assert config.steps_offset == 1 and not config.set_alpha_to_one
    assert config.timestep_spacing == "leading" and config.prediction_type == "epsilon"


def test_resolution_sets_the_sample_size_and_dtype_casts():
    pipe = build_sdxl_pipeline(resolution=512, device="meta", dtype=torch.float16)
    assert pipe.unet.config.sample_size == 64
    assert pipe.unet.dtype == pipe.vae.dtype == torch.float16
    assert pipe.text_encoder_2.dtype == torch.float16
    with pytest.raises(ValueError, match="multiple of 8"):
        build_sdxl_pipeline(resolution=1020, device="meta")


def test_family_is_sdxl(pipe):
    from ddpo_lite.families import family_of

    family = family_of(pipe)
    assert family.name == "sdxl"
    assert family.native_resolution(pipe) == 1024


def test_vram_12_keeps_the_sdxl_presets_as_they_are():
    """`train --vram 12` on the SDXL presets: predicted to fit a 12 GiB card as shipped."""
    from ddpo_lite.bench import select_for_vram
    from ddpo_lite.config import load_config

    for preset in ("sdxl-aesthetic", "sdxl-pickscore"):
        config, report = select_for_vram(load_config(preset), 12)
        assert "fits as it is" in report, report
