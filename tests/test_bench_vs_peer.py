"""scripts/bench_vs_peer.py: its peer loop (ddpo-pytorch's structure) computes what ddpo-lite
computes, so that the benchmark compares two ways of doing the same work; and the script runs.

Nothing here times anything: the script's numbers belong in docs/BENCHMARKS.md.
"""

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import torch

from ddpo_lite.config import load_config
from ddpo_lite.sampling import rollout
from ddpo_lite.update import update

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_vs_peer.py"

# one optimizer step over the whole epoch, every timestep trained: both loops then sum the same
# (sample, timestep) terms, only in another order (the peer one per backward, ddpo-lite in chunks)
EXACT = [
    'model.name="tiny"',
    "sample.num_steps=4",
    "sample.batch_size=2",
    "sample.num_batches_per_epoch=1",
    "train.batch_size=1",
    "train.gradient_accumulation=2",
    "train.timestep_fraction=1.0",
    "train.max_grad_norm=1e9",  # no clipping of the step: a wrongly scaled gradient shows
    "train.clip_range=0.2",  # wide enough that the perturbed LoRA's ratios are not all clipped
]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("bench_vs_peer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_peer_loop_matches_ddpo_lite(script):
    config = load_config("tiny", [*script.SETTINGS, *EXACT])
    run, peer = script.build(config, None)
    prompts = run.prompts[:2]

    # the same trajectory from the same noise: ddpo-lite's rollout and the peer's sampling loop
    _, trajectory = rollout(run.policy, prompts, torch.arange(2), torch.Generator().manual_seed(3))
    with torch.no_grad():
        embeds = peer.encode(prompts)
    torch.testing.assert_close(embeds, trajectory.prompt_embeds)
    samples = script.peer_batch(peer, embeds, config, torch.Generator().manual_seed(3))
    torch.testing.assert_close(samples["latents"], trajectory.latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        samples["next_latents"], trajectory.next_latents, rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(samples["timesteps"], trajectory.timesteps)
    # the per-step log-probs (means over 4 x 16 x 16 elements, from -1.2 to 2.5 here)
    torch.testing.assert_close(samples["log_probs"], trajectory.log_probs, rtol=0, atol=1e-5)

    # one update from the same LoRA, moved off the sampling one so that the ratios are not 1 (and
    # lora_A gets a gradient: B starts at zero); plain SGD at lr 1, so the step is the gradient
    with torch.no_grad():
        for p in run.params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    start = [p.detach().clone() for p in run.params]
    advantages = torch.tensor([1.3, -0.7])

    def step(train_fn) -> list[torch.Tensor]:
        for p, s in zip(run.params, start, strict=True):
            p.data.copy_(s)
        train_fn(torch.optim.SGD(run.params, lr=1.0))
        return [p.detach() - s for p, s in zip(run.params, start, strict=True)]

    peer_step = step(
        lambda sgd: script.peer_train(
            peer, samples, advantages, config, torch.Generator().manual_seed(0), sgd
        )
    )
    valid = torch.ones(2, dtype=torch.bool)
    for chunk in (0, 3):  # all 4 timesteps in one forward; 3 + 1
        chunked = script.with_chunk(config, chunk)

        def ours(sgd, c=chunked):
            generator = torch.Generator().manual_seed(0)
            update(run.accelerator, run.policy, run.model, sgd, run.params, trajectory,
                   advantages, valid, c, generator)  # fmt: skip

        ours_step = step(ours)
        norm = torch.cat([d.flatten() for d in ours_step]).norm()
        assert norm > 1e-4  # a real step (ratio within the clip range for some terms)
        for mine, theirs in zip(ours_step, peer_step, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-6 * float(norm))


def test_main_runs_on_tiny(script):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = script.main(
            ["--model", "tiny", "--repeats", "1", "--json", "--set", "sample.num_steps=2"]
        )
    assert code == 0
    result = json.loads(out.getvalue())
    assert result["kind"] == "vs-peer" and result["peak_source"] == "dispatch-counter"
    assert set(result["runs"]) == {"peer", "ours chunk 0", "ours chunk 1"}
    for entry in result["runs"].values():
        assert entry["sampling"]["peak_bytes"] > 0 and entry["training"]["median_seconds"] > 0
    # chunk 1 is the peer's shape (one timestep per forward), in ddpo-lite's code: the same
    # training peak within 10% (what differs: trajectory layout, cached prompt embeddings)
    ratio = result["ratios"]["ours chunk 1"]["training_memory"]
    assert 0.9 < ratio < 1.1, ratio
