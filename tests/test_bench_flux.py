"""FLUX.1-dev and FLUX.2-klein-4B from their published configs (`ddpo_lite.bench.flux`), on meta,
and the estimate's FLUX paths: packed 3-D latents, the guidance embedding (no CFG batch for
FLUX.1), the families' conditioning shapes, the VAE decode through the family's unpack.

The parameter counts are the released checkpoints' (FLUX.1-dev's transformer 11.90B, CLIP-L's
text tower, T5-XXL's encoder, the 16-channel VAE; klein-4B's 3.88B transformer and Qwen3-4B's
4.02B): a config written out wrongly shows up here.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2KleinPipeline, FluxPipeline

from ddpo_lite.bench.estimate import (
    GiB,
    build_meta_models,
    encode_peak,
    estimate,
    is_flux,
    is_flux2,
    is_sd3,
)
from ddpo_lite.bench.flux import (
    FLUX2_KLEIN_RANDOM,
    FLUX_DEV_RANDOM,
    build_flux2_pipeline,
    build_flux_pipeline,
)
from ddpo_lite.config import load_config

FLUX_PUBLISHED = {
    "transformer": 11_901_408_320,
    "vae": 83_819_683,
    "text_encoder": 123_060_480,
    "text_encoder_2": 4_762_310_656,
}
KLEIN_PUBLISHED = {"transformer": 3_875_544_576, "text_encoder": 4_022_468_096}

#: A tiny GRPO run as the FLUX presets shape it: groups, a window, no CFG batch, bf16 on a CPU.
TINY_GRPO = [
    "memory.mixed_precision='bf16'",
    "sample.num_steps=6",
    "sample.group_size=4",
    "sample.batch_size=4",
    "sample.num_batches_per_epoch=2",
    "sample.sde_window_size=2",
    "sample.sde_window_range=3",
    "train.algorithm='grpo'",
    "train.batch_size=2",
    "train.micro_batch_size=1",
    "train.timestep_chunk=1",
    "train.kl_coef=0.01",
    "prompts.prompts=['a red circle']",
]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def flux():
    return build_flux_pipeline(resolution=512, device="meta")


@pytest.fixture(scope="module")
def klein():
    return build_flux2_pipeline(resolution=512, device="meta")


@pytest.mark.parametrize("component", sorted(FLUX_PUBLISHED))
def test_flux_dev_parameter_counts(flux, component):
    assert n_params(getattr(flux, component)) == FLUX_PUBLISHED[component]


@pytest.mark.parametrize("component", sorted(KLEIN_PUBLISHED))
def test_klein_parameter_counts(klein, component):
    assert n_params(getattr(klein, component)) == KLEIN_PUBLISHED[component]


def test_flux_dev_shapes_and_family(flux):
    from ddpo_lite.families import family_of

    family = family_of(flux)
    config = flux.transformer.config
    assert isinstance(flux, FluxPipeline) and family.name == "flux"
    assert config.guidance_embeds and not family.has_negative_prompt
    assert flux.vae.config.latent_channels * 4 == config.in_channels == 64
    assert flux.text_encoder_2.config.d_model == config.joint_attention_dim == 4096
    assert flux.text_encoder.config.hidden_size == config.pooled_projection_dim == 768
    assert sum(config.axes_dims_rope) == config.attention_head_dim
    assert family.native_resolution(flux) == 512
    assert family.latent_shape(flux, 2, 512) == (2, 32 * 32, 64)  # packed 2x2 patches


def test_klein_shapes_and_family(klein):
    from ddpo_lite.families import family_of

    family = family_of(klein)
    config = klein.transformer.config
    assert isinstance(klein, Flux2KleinPipeline) and family.name == "flux2"
    assert not config.guidance_embeds
    assert klein.vae.config.latent_channels * 4 == config.in_channels == 128
    assert 3 * klein.text_encoder.config.hidden_size == config.joint_attention_dim == 7680
    assert klein.text_encoder.config.num_hidden_layers >= 27  # the pipeline reads layer 27
    assert family.latent_shape(klein, 1, 1024) == (1, 64 * 64, 128)


def test_resolution_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        build_flux_pipeline(resolution=520, device="meta")
    with pytest.raises(ValueError, match="multiple of 16"):
        build_flux2_pipeline(resolution=520, device="meta")


def test_names_the_estimate_reads_as_flux():
    def cfg(name):
        return load_config(None, [f'model.name="{name}"'])

    for name in (FLUX_DEV_RANDOM, "black-forest-labs/FLUX.1-dev", "tiny-flux"):
        assert is_flux(cfg(name)) and not is_flux2(cfg(name)) and not is_sd3(cfg(name))
    for name in (FLUX2_KLEIN_RANDOM, "black-forest-labs/FLUX.2-klein-base-4B", "tiny-flux2"):
        assert is_flux2(cfg(name)) and not is_flux(cfg(name)) and not is_sd3(cfg(name))


# --- the estimate's FLUX paths on the tiny models ---------------------------------------------


def _tiny(model: str, *extra: str):
    return load_config(None, [f'model.name="{model}"', *TINY_GRPO, *extra])


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-flux2"])
def test_estimate_runs_on_packed_latents(model):
    models = build_meta_models(_tiny(model))
    assert len(models.latent_shape) == 2  # (tokens, 4C): packed
    result = estimate(_tiny(model), models)
    for phase in ("sampling", "reward", "training", "prompt encoding"):
        assert result.phases[phase].peak_bytes > 0
    name = next(k for k in result.phases["training"].parts if k.startswith("transformer_weights"))
    assert name == "transformer_weights+lora"


def _step(result):
    parts = result.phases["sampling"].parts
    return next(v for k, v in parts.items() if k.startswith("transient [denoising"))


def test_flux_guidance_is_an_input_not_a_cfg_batch():
    """FLUX.1-dev's scale goes into its guidance embedding: the transformer's batch does not
    double with the scale (FLUX.2-klein's CFG does)."""
    one = estimate(_tiny("tiny-flux", "sample.guidance_scale=1.0"))
    guided = estimate(_tiny("tiny-flux", "sample.guidance_scale=3.5"))
    assert _step(guided) == _step(one)
    assert guided.phases["training"].peak_bytes == one.phases["training"].peak_bytes
    free = estimate(_tiny("tiny-flux2", "sample.guidance_scale=1.0"))
    cfg = estimate(_tiny("tiny-flux2", "sample.guidance_scale=4.0"))
    assert cfg.phases["training"].peak_bytes > free.phases["training"].peak_bytes


def test_flux_encoders_read_their_pipelines_token_counts():
    """FLUX.1 reads T5 on 512 tokens, so its encode transient is larger than on 256."""
    models = build_meta_models(_tiny("tiny-flux"))
    assert encode_peak(models, 8) > encode_peak(models, 1) > 0
    models2 = build_meta_models(_tiny("tiny-flux2"))
    assert encode_peak(models2, 8) > encode_peak(models2, 1) > 0


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-flux2"])
def test_fewer_text_tokens_lower_the_predicted_peak(model):
    """model.max_sequence_length 64 in place of the pipelines' 512: a shorter joint sequence in
    the denoising step and the backward, smaller stored conditioning, a shorter encoder
    forward; the same meta models serve both (the tokens are the config's)."""
    models = build_meta_models(_tiny(model))
    full = estimate(_tiny(model), models)
    short = estimate(_tiny(model, "model.max_sequence_length=64"), models)
    assert short.peak_bytes < full.peak_bytes
    for phase in ("prompt encoding", "sampling", "training"):
        assert short.phases[phase].peak_bytes < full.phases[phase].peak_bytes, phase
    assert encode_peak(models, 8, 64) < encode_peak(models, 8) == encode_peak(models, 8, 512)
    from ddpo_lite.config import ConfigError

    with pytest.raises(ConfigError, match="max_sequence_length = 0"):  # as the trainer refuses
        build_meta_models(_tiny(model, "model.max_sequence_length=0"))


def test_smaller_encode_batches_shrink_the_encoding_phase():
    """memory.encode_batch_size: the prompt list through the text encoder 1 prompt at a time
    holds less than 8 at a time; with encode_on_cpu only the arriving embeddings count."""
    prompts = "prompts.prompts=['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h']"
    on_gpu = [prompts, "memory.encode_on_cpu=false", "memory.offload_text_encoder=false"]
    models = build_meta_models(_tiny("tiny-flux2"))

    def encoding(*extra: str) -> int:
        return estimate(_tiny("tiny-flux2", *extra), models).phases["prompt encoding"].peak_bytes

    assert encoding(*on_gpu, "memory.encode_batch_size=1") < encoding(*on_gpu)
    on_cpu = [prompts, "memory.encode_on_cpu=true"]
    assert encoding(*on_cpu, "memory.encode_batch_size=1") < encoding(*on_cpu)


@pytest.mark.parametrize("name", ["flux", "klein"])
def test_quantized_bases_shrink_the_published_transformers(name, request):
    """Every Linear of the published transformers by bitsandbytes' storage formula: int8 about
    half of bf16, NF4 about a quarter (the tiny models' layers are too small to show it)."""
    from ddpo_lite.bench.estimate import quantized_layers, quantized_weight_bytes

    layers = quantized_layers(request.getfixturevalue(name).transformer)
    bf16 = sum(2 * layer.weight.numel() for _, layer in layers)
    int8 = sum(quantized_weight_bytes(layer.weight, "int8") for _, layer in layers)
    nf4 = sum(quantized_weight_bytes(layer.weight, "nf4") for _, layer in layers)
    assert int8 / bf16 == pytest.approx(0.5, abs=0.01)
    assert nf4 / bf16 == pytest.approx(0.26, abs=0.01)


def test_tiny_flux_models_take_the_presets_lora_targets():
    from ddpo_lite.models.lora import check_target_modules

    for preset, tiny in (("flux-pickscore", "tiny-flux"), ("flux2-pickscore", "tiny-flux2")):
        targets = load_config(preset).lora.target_modules
        models = build_meta_models(_tiny(tiny))
        # the indexed single-block entries name klein-4B's 20 blocks; the tiny model has 1
        n_single = len(models.denoiser.single_transformer_blocks)
        kept = [
            t
            for t in targets
            if not t.startswith("single_transformer_blocks.") or int(t.split(".")[1]) < n_single
        ]
        check_target_modules(models.denoiser, kept)


# --- the published models: the targets ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("preset, budget", [("flux2-pickscore", 12), ("flux-pickscore", 16)])
def test_flux_presets_fit_their_card_at_512(preset, budget):
    """The shipped levers are predicted to fit their target card (CUDA context included), and
    `train --vram` keeps them as they are."""
    from ddpo_lite.bench import select_for_vram

    config, report = select_for_vram(load_config(preset), budget)
    assert "fits as it is" in report, report
    result = estimate(config)
    assert result.device_bytes <= budget * GiB
    assert result.resolution == 512


@pytest.mark.slow
def test_flux_dev_bf16_base_does_not_fit_16_gb():
    """FLUX.1-dev's 11.9B transformer in bf16 (22 GiB) cannot fit 16 GB: `--vram 16` from a bf16
    base picks the NF4 one."""
    from ddpo_lite.bench import select_for_vram

    shipped = load_config("flux-pickscore", ["memory.quantize_base='none'"])
    assert estimate(shipped).device_bytes > 16 * GiB
    config, report = select_for_vram(shipped, 16)
    assert config.memory.quantize_base == "nf4", report
