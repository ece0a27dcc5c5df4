"""SD3.5 Medium from its published configs (`ddpo_lite.bench.sd3`), on meta, and the estimate's
flow-matching paths: the flow sampler, the SDE window, CFG-free, the quantized frozen base.

The parameter counts are the released checkpoint's (stabilityai/stable-diffusion-3.5-medium:
transformer/ 2.47B with its 384 x 384 x 1536 position-embedding buffer, vae/, text_encoder/
and text_encoder_2/ with their projections, text_encoder_3/ T5-XXL's encoder): a config written
out wrongly shows up here. The NF4 and int8 byte counts are held against what bitsandbytes
itself stores for the same weights (it quantizes on the CPU; diffusers only lets it on a GPU).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from ddpo_lite.bench.estimate import (
    GiB,
    build_meta_models,
    denoiser_bytes,
    estimate,
    is_sd3,
    quantized_layers,
    quantized_weight_bytes,
    recorded_steps,
)
from ddpo_lite.bench.sd3 import SD35_RANDOM, build_sd3_pipeline
from ddpo_lite.config import ConfigError, load_config

PUBLISHED = {
    "transformer": 2_243_171_520,
    "vae": 83_819_683,
    "text_encoder": 123_650_304,
    "text_encoder_2": 694_659_840,
    "text_encoder_3": 4_762_310_656,
}
#: SD3.5's pos_embed (384 x 384 positions x 1536) is a buffer, not a parameter: with it the
#: transformer holds 2.47B numbers (its 4.94 GB bf16 safetensors file).
POS_EMBED = 384 * 384 * 1536

#: A tiny-sd3 GRPO run as the sd35 presets shape it: groups, a window, CFG-free, bf16 on a CPU.
TINY_GRPO = [
    'model.name="tiny-sd3"',
    "memory.mixed_precision='bf16'",
    "sample.num_steps=6",
    "sample.guidance_scale=1.0",
    "sample.group_size=4",
    "sample.batch_size=4",
    "sample.num_batches_per_epoch=2",
    "train.algorithm='grpo'",
    "train.batch_size=2",
    "train.micro_batch_size=1",
    "train.timestep_chunk=1",
    "train.kl_coef=0.04",
    "prompts.prompts=['a red circle']",
]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def pipe():
    return build_sd3_pipeline(device="meta")


@pytest.mark.parametrize("component", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_ones(pipe, component):
    assert n_params(getattr(pipe, component)) == PUBLISHED[component]


def test_the_position_embedding_is_a_buffer_counted_as_weights(pipe):
    buffers = sum(b.numel() for b in pipe.transformer.buffers())
    assert buffers == POS_EMBED


def test_shapes_that_encode_prompt_feeds(pipe):
    transformer = pipe.transformer
    config = transformer.config
    # CLIP-L's and CLIP-G's pooled projections side by side: the transformer's pooled input
    assert pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim == (
        config.pooled_projection_dim
    )
    # the CLIPs' 768 + 1280 hidden states are padded to T5's width, the joint attention's input
    assert pipe.text_encoder_3.config.d_model == config.joint_attention_dim == 4096
    assert config.caption_projection_dim == config.num_attention_heads * config.attention_head_dim
    assert tuple(config.dual_attention_layers) == tuple(range(13))
    assert config.qk_norm == "rms_norm"
    assert pipe.vae.config.latent_channels == config.in_channels == 16
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 3.0


def test_family_is_sd3_at_1024_with_a_multiple_of_16(pipe):
    from ddpo_lite.families import family_of

    family = family_of(pipe)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert family.name == "sd3" and family.denoiser(pipe) is pipe.transformer
    assert family.native_resolution(pipe) == 1024
    assert family.resolution_multiple(pipe) == 16
    assert family.latent_shape(pipe, 2, 512) == (2, 16, 64, 64)


def test_resolution_and_t5_options():
    small = build_sd3_pipeline(resolution=512, device="meta", t5=False)
    assert small.transformer.config.sample_size == 64
    assert small.text_encoder_3 is None and small.tokenizer_3 is None
    with pytest.raises(ValueError, match="multiple of 16"):
        build_sd3_pipeline(resolution=520, device="meta")


def test_sd35_large_has_its_published_size():
    """SD3.5 Large's model card: 8.1B parameters (38 blocks of width 2432, no dual attention);
    the estimate builds it for its hub id and for sd35-large-random."""
    hub_id = 'model.name="stabilityai/stable-diffusion-3.5-large"'
    models = build_meta_models(load_config(None, [hub_id, "memory.drop_t5=true"]), 512)
    assert n_params(models.denoiser) == pytest.approx(8.1e9, rel=0.01)
    assert not any(b.use_dual_attention for b in models.denoiser.transformer_blocks)
    assert "SD3.5 Large" in models.note


def test_names_the_estimate_reads_as_sd3():
    names = (SD35_RANDOM, "sd35-large-random", "stabilityai/stable-diffusion-3.5-medium")
    for name in (*names, "tiny-sd3", "shapes-flow"):
        assert is_sd3(load_config(None, [f'model.name="{name}"']))
    assert not is_sd3(load_config(None, ['model.name="sdxl-random"']))


# --- the quantized base: bytes as bitsandbytes stores them ------------------------------------


@pytest.mark.parametrize("shape", [(1536, 1536), (6144, 1536), (37, 48)])
def test_nf4_bytes_are_what_bitsandbytes_stores(shape):
    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.randn(*shape)
    packed = bnb.nn.Params4bit(
        weight, requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=64
    ).to("cpu")
    state = packed.quant_state
    stored = (
        packed.data.nbytes
        + state.absmax.nbytes
        + state.code.nbytes
        + state.offset.nbytes
        + state.state2.absmax.nbytes
        + state.state2.code.nbytes
    )
    assert quantized_weight_bytes(weight, "nf4") == stored
    # about half a byte per weight once the layer is large
    if weight.numel() > 10**6:
        assert stored / weight.numel() == pytest.approx(0.5 + 1 / 64, rel=0.01)


@pytest.mark.parametrize("shape", [(1536, 1536), (37, 48)])
def test_int8_bytes_are_what_bitsandbytes_stores(shape):
    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.randn(*shape, dtype=torch.float16)
    int8 = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")
    assert int8.data.dtype == torch.int8
    assert quantized_weight_bytes(weight, "int8") == int8.data.nbytes + int8.SCB.nbytes


def _tiny(*extra: str):
    return load_config(None, [*TINY_GRPO, *extra])


def test_quantized_bases_shrink_the_transformer_lever_by_lever():
    sizes = {}
    for kind in ("none", "fp8", "int8", "nf4"):
        models = build_meta_models(_tiny(f"memory.quantize_base='{kind}'"))
        sizes[kind] = denoiser_bytes(models)
        assert models.quantize == kind
    assert sizes["none"] > sizes["fp8"] and sizes["none"] > sizes["int8"] > sizes["nf4"]
    models = build_meta_models(_tiny())
    layers = quantized_layers(models.denoiser)
    assert layers and not any("lora_" in name for name, _ in layers)
    # LoRA stays float32 on every base
    assert all(p.dtype == torch.float32 for p in models.lora_params)
    # fp8: the LoRA'd projections' base weights are stored in one byte, the norms are not
    fp8 = build_meta_models(_tiny("memory.quantize_base='fp8'"))
    dtypes = {n: p.dtype for n, p in fp8.denoiser.named_parameters()}
    assert dtypes["transformer_blocks.0.attn.to_q.base_layer.weight"] == torch.float8_e4m3fn
    assert dtypes["transformer_blocks.0.attn.to_q.lora_A.default.weight"] == torch.float32
    assert all(d != torch.float8_e4m3fn for n, d in dtypes.items() if "norm" in n)


def test_nf4_counts_a_dequantized_layer_in_the_transients():
    plain = estimate(_tiny())
    nf4 = estimate(_tiny("memory.quantize_base='nf4'"))
    for phase in ("sampling", "training"):
        assert nf4.phases[phase].peak_bytes != plain.phases[phase].peak_bytes
    name = next(k for k in nf4.phases["training"].parts if k.startswith("transformer_weights"))
    assert "nf4" in name


# --- the flow paths -------------------------------------------------------------------------


def test_an_sde_window_keeps_only_its_steps():
    full, window = _tiny(), _tiny("sample.sde_window_size=2", "sample.sde_window_range=3")
    assert recorded_steps(full) == 6 and recorded_steps(window) == 2
    a, b = estimate(full), estimate(window)
    traj = "trajectory (epoch)"
    assert b.phases["training"].parts[traj] < a.phases["training"].parts[traj]


def test_cfg_doubles_the_transformer_batch():
    free, cfg = estimate(_tiny()), estimate(_tiny("sample.guidance_scale=4.5"))

    def step(e):
        return next(v for k, v in e.phases["sampling"].parts.items() if k.startswith("transient"))

    assert cfg.phases["training"].peak_bytes > free.phases["training"].peak_bytes
    assert step(cfg) >= step(free)


def test_fewer_t5_tokens_lower_the_predicted_peak():
    """model.max_sequence_length 32 in place of SD3's 256 (zeros without T5, the tiny model's
    case): the joint sequence is 77 + 32 tokens, not 77 + 256."""
    full, short = estimate(_tiny()), estimate(_tiny("model.max_sequence_length=32"))
    assert short.peak_bytes < full.peak_bytes
    for phase in ("sampling", "training"):
        assert short.phases[phase].peak_bytes < full.phases[phase].peak_bytes, phase


def test_t5_tokens_the_published_model_takes(pipe):
    """With T5, 1 to 512 tokens (diffusers' pipeline refuses more when it samples; asked for 0,
    T5's tokenizer truncates nothing); without T5, 0 is the CLIP tokens alone. shapes-flow's
    estimate is its own model's, with no T5 tokens (its preset's setting and its default)."""
    from ddpo_lite.bench.estimate import text_tokens
    from ddpo_lite.families import sequence_length, sequence_length_problem

    assert sequence_length(pipe) == 256
    assert sequence_length_problem(pipe, 1) is None and sequence_length_problem(pipe, 512) is None
    assert "memory.drop_t5 = true" in sequence_length_problem(pipe, 0)
    assert "512" in sequence_length_problem(pipe, 513)
    assert sequence_length_problem(build_sd3_pipeline(device="meta", t5=False), 0) is None
    config = load_config("shapes-alignment-grpo")
    assert config.model.max_sequence_length == 0
    models = build_meta_models(config)
    assert models.family.name == "sd3" and text_tokens(models, config) == 0
    assert (
        text_tokens(models, load_config("shapes-alignment-grpo", ["model.max_sequence_length=-1"]))
        == 0
    )


def test_text_encoders_on_the_cpu_leave_only_the_embeddings():
    visiting = estimate(_tiny())
    on_cpu = estimate(_tiny("memory.encode_on_cpu=true"))
    assert "text_encoder_visit" in visiting.phases["prompt encoding"].parts
    parts = on_cpu.phases["prompt encoding"].parts
    assert "text_encoder_visit" not in parts and "embeddings from the CPU encoders" in parts
    assert (
        on_cpu.phases["prompt encoding"].peak_bytes < visiting.phases["prompt encoding"].peak_bytes
    )


# --- config and load-time errors ------------------------------------------------------------


def test_quantize_base_is_checked_at_setup():
    with pytest.raises(ConfigError, match="memory.quantize_base"):
        load_config(None, ["memory.quantize_base='nf2'"])
    with pytest.raises(ConfigError, match="needs a GPU"):
        load_config(None, ["memory.quantize_base='nf4'", "memory.cpu=true"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only message")
def test_bitsandbytes_without_a_gpu_is_one_line():
    from ddpo_lite.models import load_pipeline
    from ddpo_lite.models.loading import ModelLoadError

    memory = load_config(None, ["memory.quantize_base='nf4'"]).memory
    with pytest.raises(ModelLoadError) as info:
        load_pipeline("tiny-sd3", memory=memory)
    message = str(info.value)
    assert "\n" not in message and "CUDA GPU" in message and "'fp8'" in message


def test_drop_t5_applies_to_sd3_only():
    from ddpo_lite.models import load_pipeline
    from ddpo_lite.models.loading import ModelLoadError

    memory = load_config(None, ["memory.drop_t5=true"]).memory
    pipe = load_pipeline("tiny-sd3", memory=memory)
    assert pipe.text_encoder_3 is None
    with pytest.raises(ModelLoadError, match="drop_t5 applies to SD3"):
        load_pipeline("tiny", memory=memory)


def test_fp8_base_trains_on_the_cpu():
    """Layerwise fp8 storage through the real levers: weights stay fp8 after a forward and
    backward, and the LoRA (float32) gets its gradients."""
    from ddpo_lite.models import load_pipeline
    from ddpo_lite.models.lora import attach_lora
    from ddpo_lite.models.memory import apply_memory_settings

    memory = load_config(None, ["memory.quantize_base='fp8'", "memory.mixed_precision='bf16'"])
    pipe = load_pipeline("tiny-sd3")
    apply_memory_settings(pipe, memory.memory, torch.device("cpu"))
    transformer = pipe.transformer
    params = attach_lora(transformer, 4, 4.0, ["attn.to_q", "attn.to_k", "attn.to_v"])
    side = transformer.config.sample_size
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = transformer(
            hidden_states=torch.randn(1, 4, side, side),
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=torch.randn(1, 8, transformer.config.joint_attention_dim),
            pooled_projections=torch.randn(1, transformer.config.pooled_projection_dim),
            return_dict=False,
        )[0]
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    base = transformer.transformer_blocks[0].attn.to_q.base_layer.weight
    assert base.dtype == torch.float8_e4m3fn


# --- the published model: the 12 GB target ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sd35-pickscore", "sd35-ocr"])
def test_sd35_presets_fit_12_gb_at_512(preset):
    """The shipped levers are predicted to fit a 12 GiB card (CUDA context included), and
    `train --vram 12` keeps them as they are."""
    from ddpo_lite.bench import select_for_vram

    config, report = select_for_vram(load_config(preset), 12)
    assert "fits as it is" in report, report
    result = estimate(config)
    assert result.device_bytes <= 12 * GiB
    assert result.resolution == 512


@pytest.mark.slow
def test_vram_6_quantizes_the_base():
    """On a 6 GiB card the bf16 transformer does not fit (8 GiB predicted): `--vram 6` picks
    the NF4 base, which does."""
    from ddpo_lite.bench import select_for_vram

    config, report = select_for_vram(load_config("sd35-pickscore"), 6)
    assert config.memory.quantize_base == "nf4", report
    assert estimate(config).device_bytes <= 6 * GiB


def test_text_encoders_run_only_at_setup_and_on_the_cpu():
    """The prompt encoder encodes the prompt list once (preload) and serves every later batch
    from its cache: the text encoders (T5 among them on the real model) never run again, and
    with encode_on_cpu they never leave the CPU."""
    from ddpo_lite.families import family_of
    from ddpo_lite.models import load_pipeline
    from ddpo_lite.sampling import PromptEncoder

    pipe = load_pipeline("tiny-sd3")
    encoders = family_of(pipe).text_encoders(pipe)
    calls = []
    for encoder in encoders:
        encoder.register_forward_hook(lambda *_: calls.append(1))
    prompts = ["a red circle", "a blue square"]
    encoder = PromptEncoder(pipe, torch.device("cpu"), offload=True, on_cpu=True)
    encoder.preload(prompts)
    at_setup = len(calls)
    assert at_setup > 0
    cond, _ = encoder(prompts * 3)
    assert len(calls) == at_setup
    assert len(cond) == 6
    assert all(p.device.type == "cpu" for e in encoders for p in e.parameters())
