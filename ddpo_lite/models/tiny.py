"""An offline, deterministic Stable Diffusion 1.x pipeline in miniature.

The tiny pipeline has the SD 1.x architecture (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
byte-level BPE CLIPTokenizer, DDIMScheduler) with random weights, small enough to run the whole
DDPO loop on a CPU in tests. It is built from code only: nothing is downloaded. Its tokenizer's
vocabulary is learned here, by byte-pair encoding over a small English word list, so common prompt
words are single tokens and any other text still encodes through byte fallback.

`tiny_pipeline_dir` writes it once with `save_pretrained` so that it is loaded through the same
`from_pretrained` code path as a real Stable Diffusion folder.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

__all__ = [
    "TINY_VERSION",
    "build_tiny_pipeline",
    "build_tiny_tokenizer",
    "cache_root",
    "quiet_progress_bars",
    "tiny_pipeline_dir",
]

#: Bump when anything that changes the built weights or files changes, so stale caches are not reused.
TINY_VERSION = "v1"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

IMAGE_SIZE = 32  # pixels; the VAE halves it
LATENT_SIZE = 16
LATENT_CHANNELS = 4
TEXT_HIDDEN_SIZE = 32

# The words a prompt is likely to use; each becomes one token. Order does not matter (the BPE
# training below is deterministic in the set of words), but keep it free of duplicates.
_WORDS = """
a an the and or of in on at to with without by for from into onto over under above below
behind beside between near next inside outside around through across along while during
is are was be being it its this that these those there here one two three four five six
seven eight nine ten many few some several all no not very more most less small big large
tiny huge little tall short long wide narrow round square flat thick thin bright dark light
heavy soft hard smooth rough shiny matte old new young ancient modern happy sad angry calm
funny cute beautiful ugly pretty scary strange simple detailed clean dirty wet dry hot cold
warm cool fast slow quiet loud empty full open closed high low left right top bottom center
red orange yellow green blue purple pink brown black white gray grey gold silver cyan
magenta violet teal beige navy maroon colorful colourful pastel neon rainbow striped spotted
circle circles square squares triangle triangles rectangle star stars heart hearts line lines
dot dots cube sphere cone cylinder pyramid spiral hexagon pentagon oval diamond ring cross
arrow wave waves grid pattern shape shapes
cat cats dog dogs horse horses cow cows pig pigs sheep goat chicken duck ducks bird birds
fish rabbit mouse rat fox wolf bear bears lion tiger elephant giraffe zebra monkey panda
koala kangaroo deer frog turtle snake lizard owl eagle parrot penguin dolphin whale shark
octopus crab bee butterfly spider ant dragon unicorn dinosaur raccoon squirrel hamster
riding ride running run walking walk jumping jump flying fly swimming swim sitting sit
standing stand sleeping sleep eating eat drinking drink playing play dancing dance singing
sing reading read writing write cooking cook painting paint holding hold wearing wear
driving drive climbing climb skating surfing skiing fishing looking watching smiling
laughing crying fighting building carrying pushing pulling throwing catching chasing
bike bicycle car cars bus train truck boat ship plane airplane rocket motorcycle skateboard
house houses castle tower bridge road street city town village farm forest tree trees
flower flowers grass garden park field mountain mountains hill river lake sea ocean beach
island desert snow rain cloud clouds sky sun moon night day morning evening sunset sunrise
storm fire water ice stone rock sand wood metal glass paper
man woman men women boy girl child children baby person people king queen knight wizard
robot astronaut chef doctor teacher student farmer soldier pirate ninja clown
hat cap shirt dress shoes glasses crown umbrella bag book books cup mug bottle table chair
bed lamp clock window door box ball balloon kite guitar piano drum phone computer camera
apple apples banana orange pizza cake bread cheese coffee tea ice cream
photo photograph picture image painting drawing sketch illustration portrait landscape
art style oil watercolor watercolour pencil cartoon anime realistic photorealistic render
digital pixel vintage retro abstract minimalist surreal cinematic lighting background
closeup close up view scene high quality resolution sharp blurry
"""


def _word_list() -> list[str]:
    """The tokenizer's training words, de-duplicated, in first-seen order."""
    return list(dict.fromkeys(_WORDS.split()))


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@functools.lru_cache(maxsize=4)
def _train_bpe(words: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Learn BPE merges until every training word is one symbol (deterministic).

    Each step merges the most frequent adjacent pair; ties go to the lexicographically smallest
    pair. As in CLIP, the last symbol of a word carries the "</w>" suffix.
    """
    b2u = _bytes_to_unicode()
    seqs: list[list[str]] = []
    for word in words:
        chars = [b2u[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        seqs.append(chars)

    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for seq in seqs:
            counts.update(zip(seq, seq[1:], strict=False))
        if not counts:
            break
        top = max(counts.values())
        pair = min(p for p, c in counts.items() if c == top)
        merges.append(pair)
        joined = pair[0] + pair[1]
        for i, seq in enumerate(seqs):
            if len(seq) < 2:
                continue
            out: list[str] = []
            j = 0
            while j < len(seq):
                if j + 1 < len(seq) and seq[j] == pair[0] and seq[j + 1] == pair[1]:
                    out.append(joined)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out
    return tuple(merges)


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-ordered vocabulary (bytes, bytes + "</w>", merges, specials) and the merge list."""
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges = list(_train_bpe(tuple(_word_list())))
    tokens += [a + b for a, b in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer whose vocabulary is learned from a small English word list.

    Built with ``vocab=dict, merges=list``: in transformers 5, passing ``vocab_file``/``merges_file``
    paths to the constructor silently splits text wrongly.
    """
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
    )


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Hide diffusers' and transformers' load/save progress bars for the duration (not downloads)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    changed = []
    for lib in (diffusers_logging, transformers_logging):
        if lib.is_progress_bar_enabled():
            lib.disable_progress_bar()
            changed.append(lib)
    try:
        yield
    finally:
        for lib in changed:
            lib.enable_progress_bar()


def _build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def _build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def _build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=TEXT_HIDDEN_SIZE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _build_scheduler() -> DDIMScheduler:
    """DDIM configured as Stable Diffusion 1.x ships it."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )


def _ensure_nonzero_output(unet: UNet2DConditionModel, seed: int) -> None:
    """Re-initialise ``conv_out`` with small random weights if the UNet's output is identically zero."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        sample = torch.randn(1, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=gen)
        context = torch.randn(1, 4, TEXT_HIDDEN_SIZE, generator=gen)
        out = unet(sample, 10, encoder_hidden_states=context).sample
        if torch.count_nonzero(out) == 0:
            unet.conv_out.weight.copy_(
                0.02 * torch.randn(unet.conv_out.weight.shape, generator=gen)
            )
            unet.conv_out.bias.zero_()


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Build the tiny SD 1.x pipeline in memory; the same seed gives bit-identical weights.

    Images are 32x32 RGB, latents 4x16x16. The global torch RNG state is left untouched.
    """
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _build_unet()
        _ensure_nonzero_output(unet, seed)
        torch.manual_seed(seed)
        vae = _build_vae()
        torch.manual_seed(seed)
        text_encoder = _build_text_encoder(tokenizer)
    for module in (unet, vae, text_encoder):
        module.eval()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cache_root() -> Path:
    """Where ddpo-lite caches generated files: ``$DDPO_LITE_CACHE``, else ``~/.cache/ddpo-lite``."""
    env = os.environ.get("DDPO_LITE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ddpo-lite"


def _write_slow_tokenizer_files(folder: Path) -> None:
    """Add ``vocab.json``/``merges.txt`` beside ``tokenizer.json``, as real SD 1.x folders have them.

    transformers 5 reads ``tokenizer.json``; transformers 4's slow ``CLIPTokenizer`` needs these.
    """
    vocab, merges = _vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


_REQUIRED_FILES = (
    "model_index.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/config.json",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)


def _is_complete(folder: Path) -> bool:
    """Every file the pipeline needs is there (transformers' save_pretrained silently writes
    nothing on a torch.distributed rank other than 0, so a folder can exist and be empty)."""
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def tiny_pipeline_dir(seed: int = 0) -> Path:
    """Return a folder holding the tiny pipeline for ``seed`` in diffusers layout (safetensors).

    It is written once into the cache (see `cache_root`) through a temporary folder and an atomic
    rename, so concurrent processes never see a half-written folder; the loser of a race uses the
    winner's folder.
    """
    root = cache_root()
    target = root / f"tiny-{TINY_VERSION}-seed{seed}"
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cached folder is ordinary
    try:
        with quiet_progress_bars():
            build_tiny_pipeline(seed).save_pretrained(tmp, safe_serialization=True)
        _write_slow_tokenizer_files(tmp / "tokenizer")
        if not _is_complete(tmp):
            missing = [n for n in _REQUIRED_FILES if not (tmp / n).is_file()]
            raise RuntimeError(f"writing the tiny pipeline left out {missing}")
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_pipeline_once(
    target: Path, build: Callable[[], object], required: tuple[str, ...], clip_tokenizers=()
) -> Path:
    """`build()`'s pipeline saved into `target` once, through a temporary folder and an atomic
    rename (as `tiny_pipeline_dir`); `clip_tokenizers` get the slow tokenizer files too."""
    if all((target / name).is_file() for name in required):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        with quiet_progress_bars():
            build().save_pretrained(tmp, safe_serialization=True)
        for name in clip_tokenizers:
            _write_slow_tokenizer_files(tmp / name)
        missing = [n for n in required if not (tmp / n).is_file()]
        if missing:
            raise RuntimeError(f"writing {target.name} left out {missing}")
        try:
            os.rename(tmp, target)
        except OSError:
            if not all((target / name).is_file() for name in required):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
