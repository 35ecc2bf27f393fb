"""OCRReward with the real PP-OCRv4 weights of the rapidocr-onnxruntime wheel, on images with text drawn by PIL.

The ``ocr`` extra is part of ``dev``, so these tests run in CI; they skip only on Python >= 3.13, where
rapidocr-onnxruntime does not install. Each OCR read takes about 0.1-0.3 s on a CPU.
"""

import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from trl_flow_egrpo.rewards import ocr
from trl_flow_egrpo.rewards.ocr import OCR_EXTRA_HINT, OCRReward, edit_distance, ocr_score, quoted_text

needs_rapidocr = pytest.mark.skipif(
    sys.version_info >= (3, 13), reason="rapidocr-onnxruntime declares Python < 3.13 (the ocr extra is empty there)"
)


def font(size: int = 40):
    """A scalable font: Pillow's bundled one (Pillow >= 10.1), else DejaVu Sans (Pillow 10.0, the minimum)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: load_default() has only a tiny bitmap font, too small to read
        try:
            return ImageFont.truetype("DejaVuSans.ttf", size)
        except OSError:
            pytest.skip("Pillow < 10.1 and no DejaVuSans.ttf: no font large enough to draw readable text")


def render(*texts: str) -> torch.Tensor:
    """``[B, 3, 128, 448]`` floats in [0, 1]: each text in black on a light background."""
    images = []
    for text in texts:
        image = Image.new("RGB", (448, 128), (235, 225, 200))
        ImageDraw.Draw(image).text((16, 40), text, fill=(10, 10, 10), font=font())
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
    return torch.stack(images)


@pytest.fixture(scope="module")
def reward():
    """One OCRReward for the module, so the OCR models load once."""
    return OCRReward(device="cpu")


# ------------------------------------------------------------------------------------------ pure functions


def test_quoted_text_is_the_first_double_quoted_span():
    assert quoted_text('A neon sign that says "Open 24 Hours" above a door') == "Open 24 Hours"
    assert quoted_text('"first" and "second"') == "first"
    for prompt in ["no quotes at all", 'one "unclosed quote', 'an empty "" span', 'only "   " spaces']:
        with pytest.raises(ValueError, match="double quotes"):
            quoted_text(prompt)


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("sitting", "kitten") == 3
    assert edit_distance("", "abc") == edit_distance("abc", "") == 3
    assert edit_distance("flaw", "lawn") == 2
    assert edit_distance("same", "same") == 0


def test_ocr_score_is_flow_grpos():
    assert ocr_score("Hello World", "hello world") == 1.0  # case and spaces ignored
    assert ocr_score("HelloWorld", "Hello World") == 1.0
    assert ocr_score("xx HELLO yy", "hello") == 1.0  # the target inside other text counts as exact
    assert ocr_score("HELLQ", "hello") == pytest.approx(0.8)  # one substitution in five characters
    assert ocr_score("HELL", "hello") == pytest.approx(0.8)  # one deletion
    assert ocr_score("", "hello") == 0.0
    assert ocr_score("a much longer unrelated text", "hi") == 0.0  # the distance is capped at len(target)
    with pytest.raises(ValueError, match="empty"):
        ocr_score("text", "   ")


# ------------------------------------------------------------------------------------------ real weights


@needs_rapidocr
def test_right_text_scores_near_one_and_wrong_text_low(reward):
    texts = ["SUNSHINE CAFE", "Hello World", "OPEN 24 HOURS"]
    images = render(*texts)
    assert [read.replace(" ", "") for read in reward.read(images)] == [text.replace(" ", "") for text in texts]
    right = reward(images, [f'a storefront with a sign that says "{text}"' for text in texts])
    wrong = reward(images, ['a sign that says "Quantum Leap"'] * 3)
    assert right.shape == (3,) and right.dtype == torch.float32
    assert bool((right >= 0.9).all()), right
    assert bool((wrong <= 0.4).all()), wrong


@needs_rapidocr
def test_score_falls_monotonically_as_characters_are_corrupted(reward):
    target = "GOLDEN BAKERY"
    corrupted, corruptions = [target], [(0, "X"), (7, "Q"), (11, "Z"), (3, "W"), (9, "M")]
    for position, char in corruptions:  # each image changes one more character of the previous one
        previous = corrupted[-1]
        corrupted.append(previous[:position] + char + previous[position + 1 :])
    scores = reward(render(*corrupted), [f'"{target}"'] * len(corrupted)).tolist()
    assert scores[0] >= 0.9, scores
    assert all(later <= earlier for earlier, later in zip(scores[:-1], scores[1:], strict=True)), scores
    # k of the 12 characters wrong scores 1 - k/12 when the OCR reads every character; allow one misread
    assert scores == pytest.approx([1 - k / 12 for k in range(len(corrupted))], abs=1 / 12 + 1e-6), scores


@needs_rapidocr
def test_target_text_column_replaces_the_prompt(reward):
    images = render("Hello World", "Hello World")
    scores = reward(images, ["no quotes needed here", 'a sign "Goodbye"'], target_text=["hello world", "Goodbye"])
    assert scores[0] >= 0.9 and scores[1] <= 0.5, scores
    with pytest.raises(ValueError, match="one string per prompt"):
        reward(images, ["a", "b"], target_text=["only one"])
    with pytest.raises(ValueError, match="double quotes"):
        reward(images, ["no quotes", "none here"])


@needs_rapidocr
def test_blank_image_scores_zero_and_videos_are_refused(reward):
    assert reward(torch.ones(1, 3, 96, 96), ['"anything"']).tolist() == [0.0]
    with pytest.raises(ValueError, match="FrameAverageReward"):
        reward(torch.ones(1, 2, 3, 96, 96), ['"anything"'])


@needs_rapidocr
def test_registry_and_served_reward():
    pytest.importorskip("fastapi")
    from trl_flow_egrpo.registry import build_reward
    from trl_flow_egrpo.serve.protocol import ScoreBatch, quantize
    from trl_flow_egrpo.serve.server import BatchScorer, load_reward, warm_up

    assert isinstance(build_reward("ocr"), OCRReward)
    scorer = BatchScorer(load_reward("ocr", {"device": "cpu"}), "cpu", batch_size=2)
    try:
        warm_up(scorer)  # what serve-reward runs before it listens
        batch = ScoreBatch(images=quantize(render("Hello World")), prompts=['"Hello World"'], columns={})
        assert scorer.score(batch)[0] >= 0.9
    finally:
        scorer.close()


@needs_rapidocr
def test_device_checks(monkeypatch):
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        OCRReward(device="cuda:1")
    with pytest.raises(ValueError, match="'cpu', 'cuda' or None"):
        OCRReward(device="mps")
    monkeypatch.setattr(OCRReward, "cuda_available", staticmethod(lambda: False))
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        OCRReward(device="cuda")


@pytest.mark.parametrize("python", [(3, 12), (3, 13)])
def test_missing_extra_names_it(monkeypatch, python):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # makes the import raise ImportError
    monkeypatch.setattr(ocr.sys, "version_info", (*python, 0, "final", 0))
    with pytest.raises(ImportError, match="trl-flow-egrpo\\[ocr\\]") as raised:
        OCRReward()
    assert OCR_EXTRA_HINT in str(raised.value)
    assert ("Python < 3.13 only" in str(raised.value)) == (python >= (3, 13))
