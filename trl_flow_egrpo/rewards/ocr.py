"""OCR reward: does the image show the text the prompt asks for? (Flow-GRPO's text-rendering task.)

The text is read with the PP-OCRv4 detection and recognition models that the ``rapidocr-onnxruntime`` wheel
bundles (about 15 MB, run by onnxruntime), so the reward needs no download and runs offline, on a CPU or on
onnxruntime's CUDA provider. The score is Flow-GRPO's: ``1 - min(edit_distance, len(target)) / len(target)``
on lower-cased, space-free text, and 1 whenever the target appears inside the recognized text.

Install with ``pip install "trl-flow-egrpo[ocr]"`` (rapidocr-onnxruntime with onnxruntime, opencv-python,
shapely and pyclipper). rapidocr-onnxruntime declares Python < 3.13, so the extra installs nothing on newer
Pythons.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch

from ..scoring import check_scores
from .weight_free import _to_uint8_hwc

OCR_EXTRA_HINT = 'pip install "trl-flow-egrpo[ocr]"'

# Flow-GRPO reads text with PaddleOCR(use_angle_cls=False, lang="en"). These settings make rapidocr's pipeline
# PaddleOCR's: no text-direction classifier; lines recognized with confidence < 0.5 dropped (PaddleOCR's
# drop_score); the detector downscales images whose long side exceeds 960 px and keeps smaller ones as they are
# (PaddleOCR's det_limit_type="max", det_limit_side_len=960; rapidocr's own default upscales the short side to
# 736 px, which costs twice the time on 512 px images).
RAPIDOCR_SETTINGS = {
    "use_cls": False,
    "text_score": 0.5,
    "det_limit_type": "max",
    "det_limit_side_len": 960,
}


def import_rapidocr() -> ModuleType:
    """Import ``rapidocr_onnxruntime``, or raise an ImportError that names the ``ocr`` extra (and, on Python >= 3.13,
    says why it cannot install there)."""
    try:
        return importlib.import_module("rapidocr_onnxruntime")
    except ImportError as error:
        message = (
            f"OCRReward needs the optional package 'rapidocr-onnxruntime' (with onnxruntime, opencv-python, shapely "
            f"and pyclipper), which could not be imported ({error}). Install it with: {OCR_EXTRA_HINT}"
        )
        python = tuple(sys.version_info[:2])
        if python >= (3, 13):
            message += (
                f". rapidocr-onnxruntime supports Python < 3.13 only, so the extra installs nothing on Python "
                f"{python[0]}.{python[1]}: run the reward under Python 3.11 or 3.12, e.g. "
                "served from such an environment with `trl-flow-egrpo serve-reward ocr` and scored with RemoteReward."
            )
        raise ImportError(message) from error


def quoted_text(prompt: str) -> str:
    """The text a prompt asks to render: what lies between its first two double quotes (``"``).

    ``'A sign that says "Open 24 hours" on a door'`` -> ``"Open 24 hours"``. Flow-GRPO takes the same span
    (``prompt.split('"')[1]``); it also accepts a prompt with a single quote (taking the rest of the prompt),
    which is an error here, as are a prompt without quotes and an empty span.

    Raises:
        ValueError: no complete, non-empty pair of double quotes.
    """
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].strip():
        raise ValueError(
            f"OCRReward needs the text to render between double quotes in the prompt, e.g. 'a sign that says "
            f'"Open"\', got {prompt!r}. Quote the text in the prompt, or give it in a target_text column.'
        )
    return parts[1]


def normalize_text(text: str) -> str:
    """Flow-GRPO's normalization before comparing: lower case, spaces (``" "``) removed."""
    return text.replace(" ", "").lower()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions that turn ``a``
    into ``b``."""
    previous = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_score(recognized: str, target: str) -> float:
    """Flow-GRPO's OCR reward of one image, in [0, 1]: ``1 - min(d, len(t)) / len(t)`` where ``t`` and the
    recognized text are normalized (:func:`normalize_text`) and ``d`` is their edit distance; 1 when ``t`` occurs
    inside the recognized text, so other text in the image costs nothing.

    Capping ``d`` at ``len(t)`` keeps the score >= 0 when the image shows much more (unrelated) text.

    Raises:
        ValueError: the target is empty after normalization.
    """
    recognized, target = normalize_text(recognized), normalize_text(target)
    if not target:
        raise ValueError("OCRReward's target text is empty (or only spaces): give the text the image should show.")
    if target in recognized:
        return 1.0
    return 1.0 - min(edit_distance(recognized, target), len(target)) / len(target)


class OCRReward:
    """Rewards images that show the requested text: Flow-GRPO's OCR reward with PP-OCRv4 (rapidocr-onnxruntime).

    Each image's text lines are read (detection, then recognition of each detected line; lines with confidence
    < 0.5 dropped), joined in reading order and scored against the target by :func:`ocr_score`: 1 for the exact
    text (case and spaces ignored), lower as characters go wrong, 0 for no text. The target is the
    ``target_column`` column when the dataset has one, else the prompt's quoted span (:func:`quoted_text`).

    The weights ship in the rapidocr-onnxruntime wheel: nothing is downloaded. The OCR models are loaded on first
    call. Images are read one at a time (the detector takes one image; the recognizer batches that image's lines):
    0.3 s (idle) to 1.3 s (loaded) per 512 x 512 image on a two-core CPU.

    Args:
        device: ``"cpu"``; ``"cuda"`` (onnxruntime's CUDA provider, which needs the ``onnxruntime-gpu`` package
            instead of ``onnxruntime``; rapidocr runs on GPU 0 only: pick the GPU with ``CUDA_VISIBLE_DEVICES``);
            ``None`` (default): CUDA when the images are on a GPU and the provider is available, else CPU.
        target_column: the dataset column holding each image's target text, used instead of the prompt when
            present.

    Raises:
        ImportError: rapidocr-onnxruntime is not installed (the message names the ``ocr`` extra).
        ValueError: an unknown device, a GPU index other than 0, or ``"cuda"`` without onnxruntime's CUDA provider.
    """

    name = "ocr"

    def __init__(self, device: str | None = None, target_column: str = "target_text"):
        self._rapidocr = import_rapidocr()
        self.device, self.target_column = device, target_column
        if device is not None:
            parsed = torch.device(device)
            if parsed.type not in ("cpu", "cuda") or (parsed.type == "cuda" and parsed.index not in (None, 0)):
                raise ValueError(
                    f"OCRReward device must be 'cpu', 'cuda' or None, got {device!r}. rapidocr always runs on GPU 0: "
                    "choose the GPU with CUDA_VISIBLE_DEVICES."
                )
            if parsed.type == "cuda" and not self.cuda_available():
                raise ValueError(
                    "OCRReward(device='cuda') needs onnxruntime's CUDAExecutionProvider, which this onnxruntime "
                    "lacks. Replace onnxruntime with onnxruntime-gpu (pip uninstall onnxruntime && pip install "
                    "onnxruntime-gpu), or score on device='cpu'."
                )
        self._engines: dict[bool, object] = {}  # use_cuda -> RapidOCR, built on first use

    @staticmethod
    def cuda_available() -> bool:
        """Whether onnxruntime here can run on a GPU (the ``onnxruntime-gpu`` package and a visible GPU)."""
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers() and torch.cuda.is_available()

    def _engine(self, images_device: torch.device):
        """The RapidOCR pipeline for this call's device, built once per device kind."""
        if self.device is None:
            use_cuda = images_device.type == "cuda" and self.cuda_available()
        else:
            use_cuda = torch.device(self.device).type == "cuda"
        if use_cuda not in self._engines:
            self._engines[use_cuda] = self._rapidocr.RapidOCR(
                **RAPIDOCR_SETTINGS, det_use_cuda=use_cuda, rec_use_cuda=use_cuda
            )
        return self._engines[use_cuda]

    def targets(self, prompts: Sequence[str], columns: dict) -> list[str]:
        """Each image's target text: the ``target_column`` column if given, else the prompts' quoted spans."""
        if self.target_column in columns:
            texts = list(columns[self.target_column])
            if len(texts) != len(prompts) or not all(isinstance(text, str) for text in texts):
                raise ValueError(
                    f"OCRReward's {self.target_column!r} column must hold one string per prompt ({len(prompts)}), "
                    f"got {texts!r}."
                )
            return texts
        return [quoted_text(prompt) for prompt in prompts]

    def read(self, images: torch.Tensor) -> list[str]:
        """The text recognized in each image of ``[B, 3, H, W]`` floats in [0, 1]: its lines joined in reading order
        (``""`` when nothing is read)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"OCRReward scores RGB images [B, 3, H, W], got shape {tuple(images.shape)}. For videos "
                "[B, F, 3, H, W] use FrameAverageReward(OCRReward()) (registry name 'frames_ocr')."
            )
        engine = self._engine(images.device)
        texts = []
        for rgb in _to_uint8_hwc(images):
            # RapidOCR takes numpy images as OpenCV's BGR.
            lines, _ = engine(np.ascontiguousarray(rgb[..., ::-1]))
            texts.append("".join(line[1] for line in lines or []))
        return texts

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **columns) -> torch.Tensor:
        targets = self.targets(prompts, columns)
        scores = [ocr_score(text, target) for text, target in zip(self.read(images), targets, strict=True)]
        return check_scores(
            torch.tensor(scores, dtype=torch.float32, device=images.device), len(prompts), self.name, prompts
        )
