"""The `ocr` reward: the edit-distance arithmetic by hand, the quoted-text rule, and the real
OCR model (rapidocr's shipped ONNX files, offline) on images drawn here with PIL.

The model tests skip when rapidocr/onnxruntime are absent (`pip install 'ddpo-lite[ocr]'`); the
arithmetic, the prompt rule and the missing-package message run everywhere. About 10 s on one
CPU thread (13 images at about 0.7 s each, plus 1 s to load the model).
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from ddpo_lite.models.memory import MissingDependencyError
from ddpo_lite.rewards import get_reward, list_rewards
from ddpo_lite.rewards.compose import CheckedReward
from ddpo_lite.rewards.ocr import levenshtein, normalised_edit_distance, ocr_scores, target_text
from ddpo_lite.sample import read_prompts_file

# --- the arithmetic, by hand -----------------------------------------------------------------


@pytest.mark.parametrize(
    "read, target, expected",
    [
        ("OPEN", "OPEN", 0.0),  # exact
        ("open", "OPEN", 0.0),  # case is ignored
        ("Hello  World", "HelloWorld", 0.0),  # spaces are ignored, both sides
        ("GRANDBAKERYSHOP", "BAKERY", 0.0),  # the target inside more text: distance 0
        ("0PEN", "OPEN", 1 / 4),  # one substitution (0 for O), n = 4
        ("CAT", "CART", 1 / 4),  # one insertion (R), n = 4
        ("OPNE", "OPEN", 2 / 4),  # a swap is two substitutions (N->E, E->N)
        ("kitten", "sitting", 3 / 7),  # k->s, e->i, insert g: 3, n = 7
        ("", "OPEN", 4 / 4),  # nothing read: 4 insertions, n = 4
        ("QQQQQQQQQQQQ", "OPEN", 4 / 4),  # 12 edits cut to n = 4
        ("PIZZA", "OPEN", 4 / 4),  # 5 edits cut to n = 4
    ],
)
def test_normalised_edit_distance_by_hand(read, target, expected):
    assert normalised_edit_distance(read, target) == pytest.approx(expected, abs=1e-12)


def test_levenshtein_by_hand():
    assert levenshtein("", "") == 0
    assert levenshtein("abc", "") == 3 and levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2  # delete f, insert n
    assert levenshtein("sunday", "saturday") == 3  # insert a, t; n->r
    assert levenshtein("saturday", "sunday") == 3  # symmetric


def test_target_is_the_first_quoted_span():
    assert target_text('A sign that says "OPEN"') == "OPEN"
    assert target_text('a poster reading "Hello World" in neon') == "Hello World"
    assert target_text('"ONE" and "TWO"') == "ONE"  # the first, as Flow-GRPO's split('"')[1]
    assert target_text("a mug printed with \u201cCOFFEE\u201d") == "COFFEE"  # typographic
    # no text asked for: no quotes, empty quotes, or an unclosed quote
    for prompt in ("a cat", 'a sign that says ""', 'a sign that says "  "', 'a "broken'):
        assert target_text(prompt) is None


def test_a_prompt_without_quotes_scores_nan_and_is_flagged():
    """No quoted text: the reward is NaN (the trainer drops the sample with a warning), flagged
    has_target = 0, and the OCR model is not called for it."""
    calls = []

    def reader(image):
        calls.append(image)
        return ["OPEN"]

    with pytest.warns(UserWarning, match="no text in double quotes"):
        rewards, info = ocr_scores(reader, ["a", "b"], ['a sign "OPEN"', "a cat on a mat"])
    assert rewards[0] == 1.0 and math.isnan(rewards[1])
    assert info["has_target"].tolist() == [1.0, 0.0] and calls == ["a"]
    # NaN passes the reward check: dropping it is the trainer's job
    with pytest.warns(UserWarning, match="no text in double quotes"):
        checked, _ = CheckedReward(lambda i, p, m: ocr_scores(reader, i, p), "ocr")(
            ["a"], ["a cat"], [{}]
        )
    assert math.isnan(checked[0])


def test_the_ocr_prompt_lists_each_ask_for_text():
    """Every prompt of presets/prompts/ocr_{train,eval}.txt quotes its text; the held-out texts
    are not training texts."""
    folder = Path(__file__).resolve().parents[1] / "presets" / "prompts"
    targets = {}
    for split in ("train", "eval"):
        prompts = read_prompts_file(folder / f"ocr_{split}.txt")
        assert len(prompts) >= 20, split
        targets[split] = {target_text(p) for p in prompts}
        assert None not in targets[split], split
        assert len(targets[split]) == len(prompts), f"{split}: a text is asked for twice"
    assert not targets["train"] & targets["eval"]


def test_ocr_is_registered_and_says_how_to_install(monkeypatch):
    assert "ocr" in list_rewards()
    monkeypatch.setitem(sys.modules, "rapidocr", None)  # import fails as when not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'ddpo-lite\[ocr\]'") as err:
        get_reward("ocr")
    assert "\n" not in str(err.value)


# --- the real OCR model on drawn text --------------------------------------------------------


def _font(size):
    return ImageFont.load_default(size=size)  # Pillow >= 10.1 (the project's floor), FreeType


def render(text, size=256, font_size=44, fg=(20, 20, 20), bg=(240, 235, 220)):
    """`text` centred on a plain background; '\\n' starts a new line."""
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    font = _font(font_size)
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, align="center")
    xy = ((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top)
    draw.multiline_text(xy, text, fill=fg, font=font, align="center")
    return image


@pytest.fixture(scope="module")
def ocr_reward():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("rapidocr")
    return get_reward("ocr", threads=1)


def test_drawn_text_scores_near_one(ocr_reward):
    cases = [
        ('a storefront sign that reads "BAKERY"', render("BAKERY")),
        ('A sign that says "OPEN"', render("OPEN", size=512, font_size=96)),
        ('a neon sign saying "Hello World"', render("Hello\nWorld")),  # two lines, joined
        (
            'a chalkboard that says "CAFE 24"',
            render("CAFE 24", fg=(250, 250, 250), bg=(30, 60, 40)),
        ),
        ('a label reading "Fresh Fish"', render("Fresh Fish", font_size=36)),
    ]
    prompts = [p for p, _ in cases]
    rewards, info = ocr_reward([i for _, i in cases], prompts, [{}] * len(cases))
    assert rewards.shape == (len(cases),)
    assert rewards.min() >= 0.8 and rewards.mean() >= 0.95, (rewards, info["text"])
    assert info["has_target"].tolist() == [1.0] * len(cases)


def test_wrong_or_blank_images_score_low(ocr_reward):
    images = [
        render("PIZZA"),  # other text
        Image.new("RGB", (256, 256), (240, 235, 220)),  # no text at all
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)),
    ]
    rewards, info = ocr_reward(images, ['A sign that says "OPEN"'] * 3, [{}] * 3)
    assert rewards.max() <= 0.25, (rewards, info["text"])
    assert rewards[1] == 0.0 and info["text"][1] == ""  # nothing read: the full distance


def test_a_near_miss_scores_in_between(ocr_reward):
    """'OPNE' drawn, 'OPEN' asked for: the reward is whatever was read, scored by the rule
    above (read as 'OPNE' it is 1 - 2/4 = 0.5); strictly between the right and blank images."""
    rewards, info = ocr_reward([render("OPNE")], ['A sign that says "OPEN"'], [{}])
    assert rewards[0] == pytest.approx(1 - normalised_edit_distance(info["text"][0], "OPEN"))
    assert 0.0 < rewards[0] < 1.0, info["text"]


def test_the_same_image_scores_per_prompt(ocr_reward):
    """One image, two prompts: the right one scores 1, the wrong one (nothing in common) 0."""
    image = render("STOP")
    rewards, _ = ocr_reward(
        [image, image], ['a road sign that says "STOP"', 'a sign that says "WAY"'], [{}, {}]
    )
    assert rewards.tolist() == [1.0, 0.0]
