"""The LoRA a run saves loads anywhere: plain diffusers pipelines load every tensor at the trained
strength, and the kohya export (`ddpo_lite.export.export_kohya`) fuses to the same weights.

All on the tiny model, offline, on the CPU. The LoRA's B matrices start at zero, so each test LoRA
gets random B weights first; otherwise "the LoRA changes the images" could not fail.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoPipelineForText2Image,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ddpo_lite.cli import main
from ddpo_lite.export import (
    COMFYUI_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    export_comfyui,
    export_kohya,
    export_lora,
    kohya_state_dict,
)
from ddpo_lite.lora_files import LoraFileError, check_lora_file, read_lora_file
from ddpo_lite.models import load_pipeline, tiny_pipeline_dir
from ddpo_lite.models.lora import LORA_WEIGHT_NAME, attach_lora, save_lora

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPT = "a red circle"
# mid block's first self-attention query gets rank 2; every to_k gets alpha 3 (a regex suffix)
MID_Q = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
PATTERNS = {"rank_pattern": {MID_Q: 2}, "alpha_pattern": {"to_k": 3}}


def _randomize_b(unet: torch.nn.Module, seed: int) -> None:
    """Give every LoRA B matrix (zero at init) random values, so the LoRA changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def _make_lora(folder, rank: int, alpha: float, patterns: dict | None = None):
    """Train-free stand-in for a run's LoRA: attach as the trainer does, randomize B, save."""
    pipe = load_pipeline("tiny")
    if patterns is None:
        attach_lora(pipe.unet, rank, alpha, TARGETS)
    else:  # peft's per-module rank/alpha, which attach_lora does not expose
        pipe.unet.requires_grad_(False)
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            init_lora_weights="gaussian",
            target_modules=TARGETS,
            **patterns,
        )
        pipe.unet.add_adapter(config)
    _randomize_b(pipe.unet, seed=rank * 100 + int(alpha))
    meta = {"base_model": "tiny", "rank": str(rank), "alpha": str(alpha), "preset": "tiny"}
    return save_lora(pipe.unet, folder, meta).parent


@pytest.fixture(scope="module")
def base_dir():
    return tiny_pipeline_dir(0)


@pytest.fixture(scope="module")
def lora_r4_a8(tmp_path_factory):
    return _make_lora(tmp_path_factory.mktemp("r4a8") / "lora", rank=4, alpha=8)


def _saved_modules(folder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """UNet module name -> (A, B) as saved, read independently of ddpo_lite's reader."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(folder / LORA_WEIGHT_NAME, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118
            module, half = key.removeprefix("unet.").rsplit(".lora.", 1)
            out.setdefault(module, {})[half] = f.get_tensor(key)
    return {m: (d["down.weight"], d["up.weight"]) for m, d in out.items()}


def _scales(folder) -> dict[str, float]:
    """The scale peft trained each module with, from the saved adapter config."""
    with safe_open(folder / LORA_WEIGHT_NAME, framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    rp, ap = meta["unet.rank_pattern"], meta["unet.alpha_pattern"]
    scales = {}
    for module in _saved_modules(folder):
        r = next((v for k, v in rp.items() if module == k or module.endswith("." + k)), None)
        a = next((v for k, v in ap.items() if module == k or module.endswith("." + k)), None)
        r = r or meta["unet.r"]
        scales[module] = (a or meta["unet.lora_alpha"]) / (r**0.5 if meta["unet.use_rslora"] else r)
    return scales


def _assert_loaded_exactly(unet: torch.nn.Module, folder) -> None:
    """Every saved module carries exactly the saved A, B and scale; no other module has a LoRA."""
    saved, scales = _saved_modules(folder), _scales(folder)
    loaded = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(loaded) == sorted(saved), "diffusers loaded a different set of LoRA modules"
    for name, (a, b) in saved.items():
        layer = loaded[name]
        (adapter,) = layer.lora_A.keys()
        torch.testing.assert_close(layer.lora_A[adapter].weight, a, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(layer.lora_B[adapter].weight, b, rtol=0, atol=0, msg=name)
        assert layer.scaling[adapter] == pytest.approx(scales[name]), name


def _txt2img(pipe) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=2, generator=gen, output_type="np").images


def _changed(before: np.ndarray, after: np.ndarray) -> float:
    assert np.isfinite(after).all()
    return float(np.abs(before - after).max())


def test_plain_pipeline_loads_every_tensor_and_changes_images(base_dir, lora_r4_a8):
    pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    base = _txt2img(pipe)
    pipe.load_lora_weights(lora_r4_a8)
    _assert_loaded_exactly(pipe.unet, lora_r4_a8)
    with_lora = _txt2img(pipe)
    assert _changed(base, with_lora) > 1e-2
    # the same seed reproduces the same images, so the difference is the LoRA's
    np.testing.assert_array_equal(_txt2img(pipe), with_lora)


def test_auto_and_img2img_pipelines_load_it(base_dir, lora_r4_a8):
    auto = AutoPipelineForText2Image.from_pretrained(base_dir, safety_checker=None)
    auto.set_progress_bar_config(disable=True)
    base = _txt2img(auto)
    auto.load_lora_weights(lora_r4_a8)
    _assert_loaded_exactly(auto.unet, lora_r4_a8)
    assert _changed(base, _txt2img(auto)) > 1e-2

    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(base_dir, safety_checker=None)
    img2img.set_progress_bar_config(disable=True)
    init = np.random.default_rng(0).random((1, 32, 32, 3), dtype=np.float32)

    def run():
        gen = torch.Generator().manual_seed(0)
        return img2img(
            PROMPT, image=init, strength=0.9, num_inference_steps=3, generator=gen, output_type="np"
        ).images

    base = run()
    img2img.load_lora_weights(lora_r4_a8)
    _assert_loaded_exactly(img2img.unet, lora_r4_a8)
    assert _changed(base, run()) > 1e-2


def _fused_unet(base_dir, lora) -> dict[str, torch.Tensor]:
    """UNet weights after `load_lora_weights(lora)`, `fuse_lora()`, `unload_lora_weights()`."""
    pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None)
    pipe.load_lora_weights(lora)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


# the naive file below has per-module alphas, whose alpha_pattern diffusers builds with key names
# that match no module (peft warns and ignores them)
@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys:RuntimeWarning")
@pytest.mark.parametrize(
    ("rank", "alpha", "patterns"),
    [(4, 4, None), (4, 8, None), (4, 8, PATTERNS), (4, 8, {"use_rslora": True})],
    ids=["alpha=rank", "alpha!=rank", "rank_and_alpha_pattern", "rslora"],
)
def test_kohya_export_fuses_to_the_trained_weights(tmp_path, base_dir, rank, alpha, patterns):
    folder = _make_lora(tmp_path / "lora", rank, alpha, patterns)
    out = export_kohya(folder, tmp_path / "kohya.safetensors")
    assert out == tmp_path / "kohya.safetensors"

    with safe_open(out, framework="pt") as f:
        kohya = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        header = f.metadata()
    saved, scales = _saved_modules(folder), _scales(folder)
    # key names as ComfyUI maps them from the UNet: "lora_unet_" + module path with "_" for "."
    names = {"lora_unet_" + m.replace(".", "_"): m for m in saved}
    expected = {f"{n}.{p}" for n in names for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(kohya) == expected
    for name, module in names.items():
        a, b = saved[module]
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        # ComfyUI and A1111 apply (alpha / rank) * up @ down, with rank = lora_down rows
        kohya_delta = kohya[f"{name}.alpha"].item() / down.shape[0] * (up @ down)
        torch.testing.assert_close(kohya_delta, scales[module] * (b @ a), msg=name)
        torch.testing.assert_close(down, a, rtol=0, atol=0)
        if patterns is None:  # one rank, one alpha: tensors unchanged, alpha = lora_alpha
            torch.testing.assert_close(up, b, rtol=0, atol=0)
            assert kohya[f"{name}.alpha"].item() == alpha
    # one alpha for every module: diffusers' kohya loader drops per-module SD 1.x attention alphas
    assert len({kohya[f"{n}.alpha"].item() for n in names}) == 1
    assert header["ddpo_lite.base_model"] == "tiny" and header["ddpo_lite.alpha"] == str(alpha)
    assert "lora_adapter_metadata" not in header
    if patterns is None:
        assert (header["ss_network_dim"], float(header["ss_network_alpha"])) == (str(rank), alpha)
    elif "use_rslora" in patterns:  # scale alpha / sqrt(r) = 4, so kohya alpha = 4 * r
        assert float(header["ss_network_alpha"]) == 16 and set(scales.values()) == {4.0}
    else:
        assert header["ss_network_dim"] == "Dynamic" and float(header["ss_network_alpha"]) == alpha
        assert saved[MID_Q][0].shape[0] == 2 and scales[MID_Q] == alpha / 2  # patterns took effect
        assert scales["mid_block.attentions.0.transformer_blocks.0.attn1.to_k"] == 3 / rank

    base = {k: v.clone() for k, v in load_pipeline("tiny").unet.state_dict().items()}
    via_diffusers = _fused_unet(base_dir, folder)
    via_kohya = _fused_unet(base_dir, out)
    assert via_kohya.keys() == via_diffusers.keys() == base.keys()
    for key in base:
        torch.testing.assert_close(via_kohya[key], via_diffusers[key], msg=key)

    # independent closed form, every module: W + (alpha / r) * B @ A
    for module, (a, b) in saved.items():
        key = f"{module}.weight"
        closed = base[key] + scales[module] * (b @ a)
        assert not torch.allclose(closed, base[key])  # the LoRA is not a no-op here
        torch.testing.assert_close(via_kohya[key], closed, msg=key)

    # the same comparison catches a wrong strength: diffusers' converter alone sets alpha = rank
    if alpha != rank:
        naive = convert_state_dict_to_kohya(
            {
                f"unet.{m}.lora_{h}.weight": t
                for m, (a, b) in saved.items()
                for h, t in (("A", a), ("B", b))
            }
        )
        save_file(naive, tmp_path / "naive.safetensors")
        wrong = _fused_unet(base_dir, tmp_path / "naive.safetensors")
        key = f"{next(iter(saved))}.weight"
        assert not torch.allclose(wrong[key], via_kohya[key])


def _bare_copy(lora, path):
    """The LoRA's tensors without its header (no peft adapter config, no ddpo-lite fields)."""
    with safe_open(lora / LORA_WEIGHT_NAME, framework="pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, path)  # noqa: SIM118
    return path


def test_export_into_a_folder_and_reread(tmp_path, lora_r4_a8, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    out = export_kohya(lora_r4_a8 / LORA_WEIGHT_NAME, folder)
    assert out == folder / KOHYA_WEIGHT_NAME
    assert [p.name for p in folder.iterdir()] == [KOHYA_WEIGHT_NAME]  # no temp file left
    assert check_lora_file(out) == out
    kohya = read_lora_file(out)
    assert kohya.format == "kohya" and len(kohya.modules) == len(_saved_modules(lora_r4_a8))
    with pytest.raises(LoraFileError, match="already a kohya"):
        export_kohya(out, tmp_path / "again.safetensors")
    with pytest.raises(LoraFileError, match="is the LoRA being exported"):
        export_kohya(lora_r4_a8, lora_r4_a8 / LORA_WEIGHT_NAME)

    # overwriting with a different export (alpha 4, not 8) that fails at the rename leaves the
    # previous file whole and no temp file
    before = out.read_bytes()
    bare = _bare_copy(lora_r4_a8, tmp_path / "bare.safetensors")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("ddpo_lite.export.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        export_kohya(bare, out)
    assert out.read_bytes() == before
    assert [p.name for p in folder.iterdir()] == [KOHYA_WEIGHT_NAME]
    monkeypatch.undo()
    export_kohya(bare, out)
    assert out.read_bytes() != before


def test_export_without_adapter_config_keeps_scale_one(tmp_path, lora_r4_a8):
    """A diffusers LoRA with no peft config in its header loads at scale 1 (alpha = rank)."""
    bare = read_lora_file(_bare_copy(lora_r4_a8, tmp_path / "bare.safetensors"))
    assert kohya_state_dict(bare)[1] == 4
    assert kohya_state_dict(read_lora_file(lora_r4_a8))[1] == 8  # lora_alpha, since r is 4


def _one_line_error(path, match: str) -> None:
    for call in (check_lora_file, lambda p: export_kohya(p, p.parent / "out.safetensors")):
        with pytest.raises(LoraFileError, match=match) as info:
            call(path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message, message


def test_bad_files_give_one_line_errors(tmp_path, lora_r4_a8):
    _one_line_error(tmp_path / "nope.safetensors", "does not exist")
    (tmp_path / "empty").mkdir()
    _one_line_error(tmp_path / "empty", LORA_WEIGHT_NAME)

    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    _one_line_error(noise, "not a readable safetensors file")

    truncated = tmp_path / "truncated.safetensors"
    data = (lora_r4_a8 / LORA_WEIGHT_NAME).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    _one_line_error(truncated, "not a readable safetensors file")

    no_lora = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2)}, no_lora)
    _one_line_error(no_lora, "holds no LoRA weights")

    half = tmp_path / "half.safetensors"
    with safe_open(lora_r4_a8 / LORA_WEIGHT_NAME, framework="pt") as f:
        keys = [k for k in f.keys() if not k.endswith("lora.up.weight")]  # noqa: SIM118
        tensors = {k: f.get_tensor(k) for k in keys}
    save_file(tensors, half)
    _one_line_error(half, "incomplete")

    diverged = tmp_path / "nan.safetensors"
    full = load_file(lora_r4_a8 / LORA_WEIGHT_NAME)
    full[max(full)][0, 0] = float("nan")
    save_file(full, diverged)
    _one_line_error(diverged, "NaN")


# --- transformer families (SD3, FLUX.1, FLUX.2): the ComfyUI export -------------------------
# scripts/check_comfyui_keys.py shows, with ComfyUI's own loader at full size, that ComfyUI maps
# every `transformer.<module>` name of these files and none of diffusers' kohya names; these
# tests hold the export to the trained weights on tiny transformers.

_ATTN = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]
TRANSFORMERS = {
    # two blocks: the last one has no to_add_out (context_pre_only); block 0 has SD3.5's attn2,
    # which the "attn." targets leave alone
    "sd3": (
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        {
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "caption_projection_dim": 16,
            "pooled_projection_dim": 32,
            "sample_size": 8,
            "pos_embed_max_size": 8,
            "patch_size": 2,
            "in_channels": 4,
            "out_channels": 4,
            "dual_attention_layers": (0,),
            "qk_norm": "rms_norm",
        },
        _ATTN,
    ),
    "flux": (
        FluxTransformer2DModel,
        FluxPipeline,
        {
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 32,
            "in_channels": 4,
            "axes_dims_rope": (2, 2, 4),
            "guidance_embeds": True,
        },
        [*_ATTN, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
    ),
    "flux2": (
        Flux2Transformer2DModel,
        Flux2KleinPipeline,
        {
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "in_channels": 8,
            "timestep_guidance_channels": 16,
            "axes_dims_rope": (4, 4, 4, 4),
            "guidance_embeds": False,
        },
        [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "to_qkv_mlp_proj",
            "single_transformer_blocks.0.attn.to_out",
        ],
    ),
}


def _tiny_transformer(family: str) -> torch.nn.Module:
    model_class, _, config, _ = TRANSFORMERS[family]
    torch.manual_seed(0)
    return model_class(**config)


def _make_transformer_lora(
    folder, family: str, rank: int, alpha: float, patterns=None, convert: bool = False
):
    """A transformer LoRA saved by the family pipeline's `save_lora_weights` with
    `transformer_lora_layers` and the peft config, `ddpo_lite.family` in the header. The state is
    `get_peft_model_state_dict` as diffusers' SD3/FLUX scripts save it; `convert` passes it
    through `convert_state_dict_to_diffusers` first (as save_lora does for a UNet), which renames
    to_q/k/v/out to `.lora.down/up` (names diffusers' transformer loaders drop)."""
    _, pipeline_class, _, targets = TRANSFORMERS[family]
    model = _tiny_transformer(family)
    if patterns is None:
        attach_lora(model, rank, alpha, targets)
    else:
        model.requires_grad_(False)
        model.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=alpha,
                init_lora_weights="gaussian",
                target_modules=targets,
                **patterns,
            )
        )
    _randomize_b(model, seed=rank * 100 + int(alpha))
    state = get_peft_model_state_dict(model)
    if convert:
        state = convert_state_dict_to_diffusers(state)
    pipeline_class.save_lora_weights(
        folder,
        transformer_lora_layers={k: v.detach().contiguous() for k, v in state.items()},
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
        safe_serialization=True,
    )
    path = folder / LORA_WEIGHT_NAME
    with safe_open(path, framework="pt") as f:
        header = dict(f.metadata())
    header.update({"ddpo_lite.family": family, "ddpo_lite.base_model": f"tiny-{family}"})
    save_file(load_file(path), path, metadata=header)
    # the delta peft trained, per module: scaling * B @ A (independent of any file)
    deltas = {
        name: layer.scaling["default"]
        * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer)
    }
    return folder, {k: v.detach() for k, v in deltas.items()}


def _diffusers_deltas(family: str, path) -> dict[str, torch.Tensor]:
    """The weight change per module after the family's diffusers loader reads `path`."""
    _, pipeline_class, _, _ = TRANSFORMERS[family]
    model = _tiny_transformer(family)
    if pipeline_class is FluxPipeline:  # FLUX.1's loader also takes kohya-style alphas
        state, alphas, metadata = pipeline_class.lora_state_dict(
            path, return_alphas=True, return_lora_metadata=True
        )
        pipeline_class.load_lora_into_transformer(
            state, network_alphas=alphas, transformer=model, metadata=metadata
        )
    else:
        state, metadata = pipeline_class.lora_state_dict(path, return_lora_metadata=True)
        pipeline_class.load_lora_into_transformer(state, transformer=model, metadata=metadata)
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            (adapter,) = layer.lora_A.keys()
            b, a = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
            out[name] = (layer.scaling[adapter] * (b @ a)).detach()
    return out


# peft warns about the converted file's to_q/k/v/out names, which diffusers' loader drops
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
@pytest.mark.parametrize(
    ("family", "rank", "alpha", "patterns", "convert"),
    [
        ("sd3", 4, 4, None, False),
        ("sd3", 4, 8, None, False),
        ("sd3", 4, 8, None, True),
        ("flux", 4, 8, None, False),
        ("flux", 4, 8, {"use_rslora": True}, False),
        ("flux2", 4, 8, {"alpha_pattern": {"to_qkv_mlp_proj": 2}}, False),
    ],
    ids=[
        "sd3-alpha=rank",
        "sd3-alpha!=rank",
        "sd3-converted-keys",
        "flux-alpha!=rank",
        "flux-rslora",
        "flux2-alpha-pattern",
    ],
)
def test_comfyui_export_of_a_transformer_lora_keeps_the_trained_weight_change(
    tmp_path, family, rank, alpha, patterns, convert
):
    folder, trained = _make_transformer_lora(
        tmp_path / "lora", family, rank, alpha, patterns, convert
    )
    out = export_lora(folder, tmp_path / "comfy.safetensors")
    assert out == tmp_path / "comfy.safetensors"

    source = load_file(folder / LORA_WEIGHT_NAME)
    with safe_open(out, framework="pt") as f:
        exported = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        header = f.metadata()
    # the keys ComfyUI maps: transformer.<diffusers module>, each in peft's spelling
    pairs = read_lora_file(folder).modules  # "transformer.<module>" -> (down key, up key), saved
    assert set(pairs) == {f"transformer.{m}" for m in trained}
    assert set(exported) == {
        f"transformer.{m}.lora_{half}.weight" for m in trained for half in ("A", "B")
    }
    # ComfyUI reads no alpha here and applies up @ down: that must be peft's scaling * B @ A
    for module, delta in trained.items():
        down, up = (exported[f"transformer.{module}.lora_{h}.weight"] for h in ("A", "B"))
        torch.testing.assert_close(up @ down, delta, msg=module)
        torch.testing.assert_close(down, source[pairs[f"transformer.{module}"][0]], rtol=0, atol=0)
        assert not torch.allclose(delta, torch.zeros_like(delta))  # the LoRA is not a no-op
        if alpha == rank and patterns is None:  # scale 1: the saved tensors unchanged
            torch.testing.assert_close(
                up, source[pairs[f"transformer.{module}"][1]], rtol=0, atol=0
            )
    # the alpha is in the weights now, so the adapter config must go (diffusers would apply it
    # again); the ddpo-lite fields stay
    assert "lora_adapter_metadata" not in header
    assert header["ddpo_lite.family"] == family
    assert header["ddpo_lite.base_model"] == f"tiny-{family}"

    # diffusers' own loader reads the export (and the saved file, in peft's spelling) at the
    # trained strength; of the converted file it drops to_q/k/v/out
    if convert:
        assert len(_diffusers_deltas(family, folder / LORA_WEIGHT_NAME)) < len(trained)
    for path in [out] if convert else [folder / LORA_WEIGHT_NAME, out]:
        loaded = _diffusers_deltas(family, path)
        assert loaded.keys() == trained.keys()
        for module, delta in trained.items():
            torch.testing.assert_close(loaded[module], delta, msg=f"{path.name}: {module}")


def test_export_picks_the_format_by_family_and_kohya_refuses_transformers(tmp_path, lora_r4_a8):
    folder, _ = _make_transformer_lora(tmp_path / "flux" / "lora", "flux", 4, 4)
    # a folder as output: the family's file name
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert export_lora(folder, out_dir) == out_dir / COMFYUI_WEIGHT_NAME
    assert export_lora(lora_r4_a8, out_dir) == out_dir / KOHYA_WEIGHT_NAME
    assert all(k.startswith("lora_unet_") for k in load_file(out_dir / KOHYA_WEIGHT_NAME))

    with pytest.raises(LoraFileError, match="transformer.*ComfyUI applies none") as info:
        export_kohya(folder, tmp_path / "k.safetensors")
    assert "\n" not in str(info.value) and str(folder) in str(info.value)
    with pytest.raises(LoraFileError, match="UNet"):
        export_comfyui(lora_r4_a8, tmp_path / "c.safetensors")

    # the CLI: with no --output, lora_comfyui.safetensors beside the LoRA folder
    assert main(["export", str(folder)]) == 0
    assert (
        load_file(folder.parent / COMFYUI_WEIGHT_NAME).keys()
        == load_file(folder / LORA_WEIGHT_NAME).keys()
    )


def test_transformer_family_header_that_disagrees_with_the_weights(tmp_path, lora_r4_a8):
    """A UNet file whose header says flux, and a family ddpo-lite does not know: one line each."""
    header = {"ddpo_lite.family": "flux"}
    wrong = tmp_path / "wrong.safetensors"
    save_file(load_file(lora_r4_a8 / LORA_WEIGHT_NAME), wrong, metadata=header)
    with pytest.raises(LoraFileError, match="outside the transformer") as info:
        export_lora(wrong, tmp_path / "out.safetensors")
    assert "\n" not in str(info.value) and str(wrong) in str(info.value)

    unknown = tmp_path / "unknown.safetensors"
    save_file(
        load_file(lora_r4_a8 / LORA_WEIGHT_NAME), unknown, metadata={"ddpo_lite.family": "sd9"}
    )
    with pytest.raises(LoraFileError, match="'sd9'.*sd1, sdxl, sd3, flux, flux2"):
        export_lora(unknown, tmp_path / "out.safetensors")
