"""Flow-GRPO's text-rendering reward: does the image show the text the prompt asks for?

    reward = 1 - min(d, n) / n,   n = len(target),   d = 0 if target in read else lev(read, target)

target: the first double-quoted span of the prompt ('a sign that says "OPEN"' -> "OPEN"; straight
or typographic quotes); read: every line an OCR model finds in the image, joined in its reading
order; both compared with spaces removed and lower-cased; lev: the Levenshtein distance (unit
cost insert, delete, substitute). So the reward is in [0, 1]: 1 when the target appears anywhere
in what was read (extra text costs nothing), 0 when nothing close was read; a distance above n is
cut to n, so a page of unrelated text scores 0 rather than below it. This is the definition in
Flow-GRPO's `flow_grpo/ocr.py` (Liu et al. 2025), written here from that description.

A prompt with no quoted text (or only `""`) asks for no text: its reward is NaN, which the trainer
drops with a warning (an epoch where every prompt has none stops the run, saying so); `info` flags
those samples with `has_target = 0`. Flow-GRPO has no such case (its prompt lists all quote).

The OCR model is RapidOCR's (`pip install 'ddpo-lite[ocr]'`: rapidocr + onnxruntime): PaddleOCR's
PP-OCRv6 small detector and recogniser as ONNX files inside the rapidocr wheel, so it runs with no
download. Where Flow-GRPO differs: it runs PaddleOCR 2.9 with its English PP-OCR model; the
recogniser here is PP-OCRv6's (Chinese and Latin script), the one rapidocr ships. As in Flow-GRPO,
the direction classifier is off and lines read with confidence below 0.5 are dropped
(`text_score`), and the model runs on the CPU whatever the run's device (Flow-GRPO:
`use_gpu=False`); about 0.3-1 s per 512 px image on one thread.

    ddpo-lite train ... --set reward.name="ocr" --set prompts.file=presets/prompts/ocr_train.txt
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence

import numpy as np

from ddpo_lite.rewards.registry import register_reward

INSTALL = "pip install 'ddpo-lite[ocr]'"

# the first span between straight double quotes, or between typographic ones
_QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')


def target_text(prompt: str) -> str | None:
    """The text the prompt asks for: its first double-quoted span, or None when it has none
    (or the span is empty or only spaces)."""
    match = _QUOTED.search(prompt)
    if match is None:
        return None
    text = match.group(1) if match.group(1) is not None else match.group(2)
    return text if text.strip() else None


def _canonical(text: str) -> str:
    """What is compared: no whitespace, lower case ("Hello World" -> "helloworld")."""
    return "".join(text.split()).lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit costs (insert, delete, substitute); O(len(a) * len(b))."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))  # distances from a[:0] to each prefix of b
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete ca
                    current[j - 1] + 1,  # insert cb
                    previous[j - 1] + (ca != cb),  # substitute (free when equal)
                )
            )
        previous = current
    return previous[-1]


def normalised_edit_distance(read: str, target: str) -> float:
    """min(d, n) / n in [0, 1], after removing spaces and lower-casing both; d = 0 when the
    target is a substring of what was read, else lev(read, target); n = len(target)."""
    read, target = _canonical(read), _canonical(target)
    if not target:
        raise ValueError("the target text is empty")
    distance = 0 if target in read else levenshtein(read, target)
    return min(distance, len(target)) / len(target)


def ocr_scores(reader, images: Sequence, prompts: Sequence[str]) -> tuple[np.ndarray, dict]:
    """Rewards (B,) and info for a batch; `reader(image) -> list of text lines`."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    rewards = np.full(len(images), math.nan)
    has_target = np.zeros(len(images))
    exact = np.zeros(len(images))
    texts = []
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        target = target_text(prompt)
        if target is None:
            warnings.warn(
                f"ocr reward: prompt {prompt!r} has no text in double quotes to look for; "
                "its reward is NaN (the sample is dropped)",
                stacklevel=2,
            )
            texts.append("")
            continue
        read = "".join(reader(image))
        texts.append(read)
        rewards[i] = 1.0 - normalised_edit_distance(read, target)
        has_target[i] = 1.0
        exact[i] = float(rewards[i] == 1.0)
    return rewards, {"has_target": has_target, "exact": exact, "text": texts}


@register_reward("ocr", "Flow-GRPO's OCR reward: 1 - normalised edit distance to the quoted text")
def ocr(threads: int | None = None, text_score: float = 0.5):
    """`threads`: onnxruntime's intra-op threads (None: its default, every core);
    `text_score`: lines read with lower confidence are dropped (0.5, as PaddleOCR's default)."""
    try:
        import onnxruntime  # noqa: F401  (rapidocr needs it but does not declare it)
        from rapidocr import RapidOCR
    except ImportError as err:
        from ddpo_lite.models.memory import MissingDependencyError

        raise MissingDependencyError(
            f"reward 'ocr' needs rapidocr and onnxruntime ({err}): {INSTALL}"
        ) from err

    params = {
        "Global.log_level": "error",  # not a warning per image with no text
        "Global.use_cls": False,  # no 180-degree classifier (Flow-GRPO: use_angle_cls=False)
        "Global.text_score": text_score,
    }
    if threads is not None:
        params["EngineConfig.onnxruntime.intra_op_num_threads"] = int(threads)
    engine = RapidOCR(params=params)

    def read(image) -> list[str]:
        out = engine(image.convert("RGB"))  # a PIL image: rapidocr converts RGB -> BGR itself
        return list(out.txts or ())  # txts is None when no text was detected

    def reward(images, prompts, metadata):
        return ocr_scores(read, images, prompts)

    return reward
