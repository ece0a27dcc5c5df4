"""The memory counter, the meta-device estimate, `bench --json` and `select_for_vram`.

The counter is checked against byte counts worked out by hand; the estimate against the same
counter on a real CPU run of the tiny model; nothing here times anything.
"""

import argparse
import contextlib
import io
import json

import pytest
import torch
import torch.nn.functional as F

from ddpo_lite.bench import add_bench_arguments, run_bench, select_for_vram
from ddpo_lite.bench.counting import MemoryCounter, MetaAutocast
from ddpo_lite.bench.estimate import OVERLAP_PHASE, GiB, adam_state_bytes, estimate
from ddpo_lite.config import ConfigError
from tests.conftest import tiny_config


def test_counter_known_sequence():
    with MemoryCounter() as counter:
        a = torch.empty(1000)  # 4000 B
        view = a.view(10, 100)  # a view: no new storage
        a.add_(1)  # in place: nothing new
        assert (counter.current, counter.peak) == (4000, 4000)
        b = torch.empty(500, dtype=torch.float64)  # 4000 B
        assert counter.current == 8000
        del b
        assert (counter.current, counter.peak) == (4000, 8000)
        c = torch.empty(100, dtype=torch.float16)  # 200 B
        del a, view  # the storage lives while the view does; both gone now
        assert counter.current == 200
        del c
    assert counter.current == 0 and counter.peak == 8000


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_counter_linear_forward_backward_by_hand(device):
    """Linear 64 -> 32, batch 8, float32, input not requiring grad:
    forward: output 8*32*4 = 1024 B (the weight's .t() is a view: 0 B)
    backward: loss 4 B and its ones_like grad 4 B (transient), grad_W 32*64*4 = 8192 B,
    grad_b 32*4 = 128 B. After backward: output + grad_W + grad_b = 9344 B;
    peak: those + loss + its grad = 9352 B."""
    layer = torch.nn.Linear(64, 32).to(device)
    x = torch.randn(8, 64).to(device)
    with MemoryCounter() as counter:
        y = layer(x)
        assert counter.current == 1024
        y.sum().backward()
    assert counter.current == 1024 + 8192 + 128
    assert counter.peak == 1024 + 8192 + 128 + 4 + 4


def test_sdpa_counted_without_the_attention_matrix():
    """8 heads, 4096 tokens, head dim 40, fp16 (the SD 1.5 UNet's first attention at 512 px, CFG
    batch 1). One N x N fp16 score matrix alone is 8*4096*4096*2 B = 256 MiB."""
    shape = (1, 8, 4096, 40)
    nxn = 8 * 4096 * 4096 * 2

    def peak(efficient: bool) -> int:
        q, k, v = (
            torch.empty(shape, device="meta", dtype=torch.float16, requires_grad=True)
            for _ in range(3)
        )
        with MemoryCounter() as counter, MetaAutocast(None, efficient_sdpa=efficient):
            F.scaled_dot_product_attention(q, k, v).sum().backward()
        return counter.peak

    efficient, math_path = peak(True), peak(False)
    # by hand: out 2.5 MiB + lse 128 KiB (+ dQ, dK, dV 7.5 MiB, delta 128 KiB in backward)
    assert efficient < 16 * 2**20 < nxn
    assert math_path > nxn
    assert efficient * 20 < math_path


@pytest.mark.parametrize(
    "model, levers",
    [
        ("tiny", ["memory.attention='math'", "memory.gradient_checkpointing=true"]),
        ("tiny-sd3", ["memory.quantize_base='fp8'", "memory.mixed_precision='bf16'"]),
        ("tiny-flux2", ["memory.mixed_precision='bf16'", "memory.offload_text_encoder=false"]),
    ],
)
def test_meta_outputs_made_from_the_cache_count_the_same_bytes(
    tmp_path, monkeypatch, model, levers
):
    """The counter makes a meta op's outputs from their cached shapes instead of running its
    meta kernel again: every phase of the estimate is the same to the byte as with every op
    run (attention as diffusers runs it, checkpointing's recompute, fp8 casting, a text
    encoder on the card), and the cache was used."""
    from ddpo_lite.bench import counting

    config = _tiny_gpu_config(tmp_path, f"model.name='{model}'", *levers)

    def phases():
        return {name: p.peak_bytes for name, p in estimate(config).phases.items()}

    cache: dict = {}
    monkeypatch.setattr(counting, "_META_OUTPUTS", cache)
    first, again = phases(), phases()  # the first fills the cache, the second reads it
    made = [spec for spec in cache.values() if spec is not counting._RUN]
    assert len(made) > 20 and len(cache) > len(made)  # specs, and ops that must run (views)

    def run_every_op(func, args, kwargs):
        return func(*args, **kwargs), False

    monkeypatch.setattr(counting, "meta_call", run_every_op)
    assert first == again == phases()


def test_8bit_adam_state_formula_matches_bitsandbytes():
    """uint8 moments + fp32 absmax per 256 elements for tensors >= 4096 elements, fp32 below."""
    bnb = pytest.importorskip("bitsandbytes")
    params = [torch.nn.Parameter(torch.randn(n)) for n in (1280, 3072, 5120, 8192, 10000)]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
    optimizer.step()
    real = sum(
        v.numel() * v.element_size()
        for p in params
        for key, v in optimizer.state[p].items()
        if torch.is_tensor(v) and not key.startswith("qmap")  # qmaps are shared, not per tensor
    )
    assert adam_state_bytes(params, use_8bit=True) == real
    assert adam_state_bytes(params, use_8bit=False) == 8 * sum(p.numel() for p in params)


def test_sd15_configs_have_the_published_sizes():
    from ddpo_lite.bench.sd15 import build_clip_vision, build_sd15_pipeline

    pipe = build_sd15_pipeline(device="meta")
    counts = [
        sum(p.numel() for p in m.parameters())
        for m in (pipe.unet, pipe.vae, pipe.text_encoder, build_clip_vision(device="meta"))
    ]
    assert counts == [859_520_964, 83_653_863, 123_060_480, 303_966_208]


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    """`ddpo-lite bench --preset tiny --epochs 1 --json`, run once for the tests below."""
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    out = tmp_path_factory.mktemp("bench")
    args = parser.parse_args(
        ["--preset", "tiny", "--epochs", "1", "--json", "--set", f'output_dir="{out}"']
    )
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert run_bench(args) == 0
    return json.loads(stdout.getvalue())


@pytest.mark.xdist_group("bench_json")  # one worker builds the module fixture
def test_bench_json_has_the_keys(bench_json):
    assert bench_json["kind"] == "measurement"
    assert bench_json["peak_source"] == "dispatch-counter"  # CPU: counted, not allocator-measured
    assert set(bench_json["phases"]) == {"sampling", "reward", "training"}
    for phase in bench_json["phases"].values():
        assert phase["peak_bytes"] > 0 and phase["samples_per_second"] > 0
        assert phase["seconds"] > 0
    assert bench_json["peak_bytes"] == max(p["peak_bytes"] for p in bench_json["phases"].values())
    assert bench_json["seconds_per_epoch"] > 0 and bench_json["samples_per_second"] > 0
    assert bench_json["estimate"]["kind"] == "estimate"


@pytest.mark.xdist_group("bench_json")  # one worker builds the module fixture
@pytest.mark.parametrize("phase", ["sampling", "training"])
def test_estimate_within_15_percent_of_the_counted_cpu_run(bench_json, phase):
    """The meta-device estimate (models on meta, phases composed by formula) against the same
    counter on the real tiny run (real tensors, CPU kernels, trainer code)."""
    measured = bench_json["phases"][phase]["peak_bytes"]
    predicted = bench_json["estimate"]["phases"][phase]["peak_bytes"]
    assert abs(predicted - measured) <= 0.15 * measured, (phase, predicted, measured)


def _tiny_gpu_config(tmp_path, *overrides):
    # the tiny preset runs on the CPU; --vram is about a GPU, so pretend it goes to one
    return tiny_config(tmp_path, "memory.cpu=false", *overrides)


def test_select_for_vram_fits_the_budget(tmp_path):
    config = _tiny_gpu_config(tmp_path)  # 4 samples x 5 timesteps per backward, no checkpointing
    budget_gb = (estimate(config).device_bytes - 2**20) / GiB  # 1 MiB short: it does not fit
    chosen, report = select_for_vram(config, budget_gb)
    assert estimate(chosen).device_bytes <= budget_gb * GiB
    assert chosen is not config and "predicted peak" in report and "estimate" in report
    assert config.train.timestep_chunk == 0  # the caller's config is left alone
    assert chosen.memory.offload_vae and not config.memory.offload_vae  # a free lever
    # the JPEG reward runs no model: overlapping it costs nothing, and there is none to offload
    assert chosen.reward.overlap and not chosen.memory.offload_reward


def test_offload_vae_leaves_every_phase_but_the_decode(tmp_path):
    """memory.offload_vae in the estimate: the VAE's weights leave what every phase holds and
    come back, as a visit, for the decode alone."""
    from ddpo_lite.bench.counting import module_bytes
    from ddpo_lite.bench.estimate import build_meta_models

    config = _tiny_gpu_config(tmp_path)
    models = build_meta_models(config)
    vae = module_bytes(models.vae)
    assert vae > 0
    resident = estimate(config, models)
    config.memory.offload_vae = True
    offloaded = estimate(config, models)
    for name in ("training", "reward", "prompt encoding"):
        assert offloaded.phases[name].peak_bytes == resident.phases[name].peak_bytes - vae
        assert "vae_weights" not in offloaded.phases[name].parts
    decode = {k: v for k, v in offloaded.phases["sampling"].parts.items() if "VAE decode" in k}
    if decode:  # the decode is the sampling phase's peak moment: the VAE is there
        assert decode["vae_weights_visit [VAE decode]"] == vae
    assert offloaded.phases["sampling"].peak_bytes <= resident.phases["sampling"].peak_bytes


def test_select_for_vram_offloads_no_reward_that_has_no_model(tmp_path):
    """At a budget only the floor fits (every lever, 1 sample x 1 timestep), the JPEG reward's
    offload and overlap are left as they were: it has no model to move."""
    config = _tiny_gpu_config(tmp_path)
    floor = _tiny_gpu_config(
        tmp_path,
        "memory.gradient_checkpointing=true",
        "memory.offload_vae=true",
        "memory.quantize_base='nf4'",
        "memory.encode_on_cpu=true",
        "memory.encode_batch_size=8",
        "train.micro_batch_size=1",
        "train.timestep_chunk=1",
    )
    chosen, _ = select_for_vram(config, estimate(floor).device_bytes / GiB)
    assert chosen.memory.quantize_base == "nf4"  # the ladder went all the way down
    assert not chosen.memory.offload_reward and chosen.reward.overlap


def test_select_for_vram_turns_overlap_off_before_offloading_or_checkpointing(tmp_path):
    """A model reward scored while the next batch samples holds a denoising step beside it: on
    a budget only that moment exceeds, `--vram` turns reward.overlap off and no other lever."""
    free = [  # the free levers
        "memory.offload_text_encoder=true",
        "memory.offload_vae=true",
        "memory.encode_batch_size=8",
    ]
    config = _tiny_gpu_config(tmp_path, "reward.name='aesthetic'", *free)

    def predicted(*overrides: str) -> int:
        return estimate(_tiny_gpu_config(tmp_path, "reward.name='aesthetic'", *free, *overrides))

    leanest = ["train.micro_batch_size=1", "train.timestep_chunk=1"]
    budget = predicted(*leanest, "reward.overlap=false").device_bytes
    overlapped = predicted(*leanest)  # the smallest backward does not help: the overlap is the peak
    assert overlapped.device_bytes > budget
    assert max(overlapped.phases, key=lambda n: overlapped.phases[n].peak_bytes) == OVERLAP_PHASE
    chosen, report = select_for_vram(config, budget / GiB)
    assert not chosen.reward.overlap and config.reward.overlap
    assert not chosen.memory.offload_reward and not chosen.memory.gradient_checkpointing
    assert "reward.overlap: True -> False" in report
    assert OVERLAP_PHASE not in estimate(chosen).phases
    assert estimate(chosen).device_bytes <= budget


def test_select_for_vram_refuses_an_impossible_budget(tmp_path):
    config = _tiny_gpu_config(tmp_path)
    with pytest.raises(ConfigError, match="nothing fits"):
        select_for_vram(config, 0.1)  # below the CUDA context alone
    with pytest.raises(ConfigError, match="--vram"):
        select_for_vram(config, 0)


def test_the_built_in_default_never_needs_more_than_the_authors_loop():
    """Issue 20: with no preset, training runs one timestep per forward+backward over the train
    batch, as ddpo-pytorch does (its memory), not all 50 at once (50x the activations)."""
    from ddpo_lite.bench.estimate import build_meta_models
    from ddpo_lite.config import load_config

    sd15 = ['model.name="sd15-random"', "memory.cpu=false"]
    default = load_config(None, sd15)
    models = build_meta_models(default, 512)  # one meta SD 1.5 for the three estimates

    def peak(*overrides: str) -> int:
        config = load_config(None, [*sd15, *overrides])
        return estimate(config, models).phases["training"].peak_bytes

    assert peak() <= peak("train.timestep_chunk=1") < peak("train.timestep_chunk=0")
