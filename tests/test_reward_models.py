"""Model-based rewards (HPSv2, CLIP score, PickScore, ImageReward), tested offline on tiny random models.

Each model is a miniature of the real architecture with random weights, written to disk in the official file
format and key layout (``reward_fixtures``), then loaded through the same code that reads the official
files. Scores are compared with the official scoring recipe run on the same weights, and the torch
preprocessing with the official PIL/torchvision/transformers transforms.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may reach for the Hub; a miss fails fast instead of retrying

import reward_fixtures as fixtures  # noqa: E402
from trl_flow_egrpo.rewards import CLIPScoreReward, HPSv2Reward, ImageRewardReward, PickScoreReward  # noqa: E402
from trl_flow_egrpo.rewards._common import (  # noqa: E402
    EXTRA_HINT,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    resize_center_crop_normalize,
    resize_longest_pad_normalize,
)
from trl_flow_egrpo.rewards.image_reward import official_key_to_module_key  # noqa: E402
from trl_flow_egrpo.rewards.pickscore import _clip_processor_preprocess  # noqa: E402
from trl_flow_egrpo.scoring import check_scores  # noqa: E402

PROMPTS = ["a photo of a cat", "a red car on the tree", "the blue sky", "a dog", "cats of the sky"]
# Heights x widths: square, portrait, landscape, extreme ratios, up- and downscaling, odd crop margins.
SIZES = [(64, 64), (100, 60), (333, 517), (224, 224), (50, 300), (1024, 768), (225, 227), (227, 225)]
IMAGE_KINDS = pytest.mark.parametrize("sharp", [False, True], ids=["vae-like", "sharp"])


def sample_images(height: int, width: int, count: int = 1, seed: int = 0, sharp: bool = False) -> torch.Tensor:
    """``[count, 3, H, W]`` floats in [0, 1] on the uint8 grid (so PIL sees exactly the same image).

    By default smooth gradients plus noise, like a decoded image: the noise makes resampling differences
    visible, the gradients give the models something besides noise. ``sharp=True`` gives full-range noise
    instead, whose bicubic overshoot shows whether intermediate results saturate as in PIL.
    """
    generator = torch.Generator().manual_seed(seed)
    if sharp:
        return torch.randint(0, 256, (count, 3, height, width), generator=generator) / 255.0
    rows = torch.linspace(0, 1, height).view(1, 1, height, 1)
    cols = torch.linspace(0, 1, width).view(1, 1, 1, width)
    phase = torch.rand(count, 3, 1, 1, generator=generator)
    smooth = 0.5 + 0.4 * torch.sin(6.0 * (rows + 2 * cols * phase) + 6.0 * phase)
    images = 0.7 * smooth + 0.3 * torch.rand(count, 3, height, width, generator=generator)
    return images.mul(255).round().div(255)


def to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(image.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def assert_matches_uint8_pipeline(ours: torch.Tensor, official: torch.Tensor, std) -> None:
    """Our float preprocessing vs an official uint8 one, compared in pixel units (x std, x 255).

    PIL (and torchvision on uint8 tensors) resamples in fixed point and rounds to uint8 after the horizontal
    pass and again at the end, so each output pixel may differ by about one uint8 level from the exact float
    result: allow 1.5 levels per pixel and 0.5 on average. A wrong kernel, size, crop offset or mean/std
    gives differences of many levels.
    """
    assert ours.shape == official.shape
    levels = (ours - official).abs() * torch.tensor(std).view(-1, 1, 1) * 255
    assert levels.max() <= 1.5, f"max difference {levels.max():.2f} uint8 levels"
    assert levels.mean() <= 0.5, f"mean difference {levels.mean():.3f} uint8 levels"


# ----------------------------------------------------------------------------------------------------------
# Fixtures: tiny models on disk, built once per module.


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run this module single-threaded: the tiny models gain nothing from intra-op threads, and on a busy
    two-core machine competing threads made the module four times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def open_clip_checkpoints(tmp_path_factory):
    """(hps_checkpoint, open_clip_checkpoint) of one tiny open_clip model."""
    return fixtures.save_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))


@pytest.fixture(scope="module")
def pickscore_dirs(tmp_path_factory):
    """(model_dir, processor_dir) of a tiny PickScore."""
    return fixtures.save_tiny_pickscore(tmp_path_factory.mktemp("pickscore"))


@pytest.fixture(scope="module")
def image_reward_files(tmp_path_factory):
    """ImageRewardReward keyword arguments loading a tiny ImageReward from official-format files."""
    return fixtures.save_tiny_image_reward(tmp_path_factory.mktemp("image_reward"))


@pytest.fixture(scope="module")
def hps(open_clip_checkpoints):
    """HPSv2.1 reward on the tiny open_clip checkpoint (batches of 2)."""
    return HPSv2Reward(checkpoint=str(open_clip_checkpoints[0]), model_name=fixtures.TINY_OPEN_CLIP_NAME, batch_size=2)


@pytest.fixture(scope="module")
def pickscore(pickscore_dirs):
    """PickScore reward on the tiny CLIPModel (batches of 2)."""
    return PickScoreReward(*map(str, pickscore_dirs), batch_size=2)


@pytest.fixture(scope="module")
def image_reward(image_reward_files):
    """ImageReward reward on the tiny official-format checkpoint (batches of 2)."""
    return ImageRewardReward(**image_reward_files, batch_size=2)


# ----------------------------------------------------------------------------------------------------------
# Optional dependencies, validation.


def test_package_imports_without_open_clip_and_the_open_clip_rewards_say_what_to_install():
    code = (
        "import sys; sys.modules['open_clip'] = None\n"
        "import trl_flow_egrpo.rewards as rewards\n"
        "for cls in (rewards.HPSv2Reward, rewards.CLIPScoreReward):\n"
        "    try:\n"
        "        cls()\n"
        "    except ImportError as error:\n"
        "        print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all(EXTRA_HINT in line for line in lines), result.stdout
    assert "hps_v2.1" in lines[0] and "clip_score" in lines[1]


def test_check_scores_names_the_reward():
    assert torch.equal(check_scores(torch.tensor([0.5, -1.0]), 2, "r"), torch.tensor([0.5, -1.0]))
    with pytest.raises(ValueError, match="Reward 'my_reward' returned \\(3,\\) values for 2 images"):
        check_scores(torch.zeros(3), 2, "my_reward")
    with pytest.raises(ValueError, match="Reward 'my_reward' returned \\(2, 1\\) values"):
        check_scores(torch.zeros(2, 1), 2, "my_reward")
    with pytest.raises(ValueError, match="Reward 'my_reward' returned NaN or inf for 2 of 3 images"):
        check_scores(torch.tensor([0.0, math.nan, math.inf]), 3, "my_reward")


def test_broken_model_output_raises_naming_the_reward(open_clip_checkpoints):
    reward = HPSv2Reward(checkpoint=str(open_clip_checkpoints[0]), model_name=fixtures.TINY_OPEN_CLIP_NAME)
    images = sample_images(32, 32, count=2)
    reward(images, PROMPTS[:2])
    with torch.no_grad():
        reward._model.visual.proj.fill_(math.nan)
    with pytest.raises(ValueError, match="Reward 'hps_v2.1' returned NaN or inf for 2 of 2 images.*dtype"):
        reward(images, PROMPTS[:2])


def test_inputs_are_checked(hps):
    with pytest.raises(ValueError, match="got 2 images but 3 prompts"):
        hps(sample_images(32, 32, count=2), PROMPTS[:3])
    with pytest.raises(ValueError, match=r"expects images of shape \[B, 3, H, W\]"):
        hps(torch.rand(2, 32, 32), PROMPTS[:2])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        PickScoreReward(batch_size=0)
    with pytest.raises(ValueError, match="floating torch dtype"):
        ImageRewardReward(dtype="int8")


# ----------------------------------------------------------------------------------------------------------
# Torch preprocessing vs the official transforms.


@IMAGE_KINDS
@pytest.mark.parametrize("size", SIZES)
def test_preprocessing_matches_open_clip_eval_transform(size, sharp):
    """CLIP score: open_clip's eval transform of ViT-H-14."""
    from open_clip import image_transform

    image = sample_images(*size, sharp=sharp)
    official = image_transform(224, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)(to_pil(image[0]))
    ours = resize_center_crop_normalize(image, 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)[0]
    assert_matches_uint8_pipeline(ours, official, OPENAI_CLIP_STD)


def official_hps_transform(size: int, mean, std):
    """The official HPSv2 scorer's ``preprocess_val`` (``light_augmentation=True``), for PIL images.

    Written from the behaviour of hpsv2's ``image_transform(..., resize_longest_max=True)``: ``ToTensor``
    first, then ``ResizeMaxSize``, i.e. torchvision's tensor ``resize`` to ``round(side * size / longest)``
    per side (bicubic; torchvision antialiases tensors by default), left alone when the longest side is
    already ``size``, zero padding with ``pad // 2`` before and the rest after, then ``Normalize``.
    """
    from torchvision.transforms import InterpolationMode, Normalize, ToTensor
    from torchvision.transforms import functional as TF

    def transform(image):
        pixels = ToTensor()(image.convert("RGB"))
        height, width = pixels.shape[1:]
        scale = size / float(max(height, width))
        if scale != 1.0:
            new_height, new_width = round(height * scale), round(width * scale)
            pixels = TF.resize(pixels, [new_height, new_width], InterpolationMode.BICUBIC)
            pad_height, pad_width = size - new_height, size - new_width
            pixels = TF.pad(
                pixels,
                [pad_width // 2, pad_height // 2, pad_width - pad_width // 2, pad_height - pad_height // 2],
                fill=0,
            )
        return Normalize(mean, std)(pixels)

    return transform


@IMAGE_KINDS
@pytest.mark.parametrize("size", [(720, 720), (720, 1280), (1024, 576), (300, 500), *SIZES])
def test_hps_preprocessing_is_the_official_validation_transform(size, sharp):
    """HPSv2: the official scorer resizes the longest side and zero-pads; it resamples floats (ToTensor comes
    first), so on images on the uint8 grid the two agree to float rounding, not just to a uint8 level."""
    image = sample_images(*size, sharp=sharp)
    official = official_hps_transform(224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)(to_pil(image[0]))
    ours = resize_longest_pad_normalize(image, 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)[0]
    assert ours.shape == official.shape == (3, 224, 224)
    torch.testing.assert_close(ours, official, atol=1e-5, rtol=0)


def test_hps_preprocessing_pads_images_whose_longest_side_fits_and_refuses_slivers():
    """The official transform leaves a 224 x 150 image unpadded (the model then cannot take it); ours pads it
    like any other, without resampling."""
    image = sample_images(224, 150)
    pixels = resize_longest_pad_normalize(image, 224, (0, 0, 0), (1, 1, 1))
    assert pixels.shape == (1, 3, 224, 224)
    assert torch.equal(pixels[..., 37:187], image) and not pixels[..., :37].any() and not pixels[..., 187:].any()
    with pytest.raises(ValueError, match="1 x 500 pixels .* would be 0 x 224.*aspect ratio"):
        resize_longest_pad_normalize(torch.rand(1, 3, 1, 500), 224, (0, 0, 0), (1, 1, 1))


@IMAGE_KINDS
@pytest.mark.parametrize("size", SIZES)
def test_preprocessing_matches_image_reward_transform(size, sharp):
    """ImageReward: the torchvision pipeline of the official ``ImageReward._transform(224)``."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    official_transform = Compose(
        [
            Resize(224, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(224),
            lambda image: image.convert("RGB"),
            ToTensor(),
            Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ]
    )
    image = sample_images(*size, sharp=sharp)
    ours = resize_center_crop_normalize(image, 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)[0]
    assert_matches_uint8_pipeline(ours, official_transform(to_pil(image[0])), OPENAI_CLIP_STD)


def clip_image_processor_class(backend: str):
    """transformers' CLIP image processor on the ``"torchvision"`` or ``"pil"`` backend, in either major version.

    transformers 5 names them ``CLIPImageProcessor`` and ``CLIPImageProcessorPil``; 4.x names them
    ``CLIPImageProcessorFast`` and ``CLIPImageProcessor``.
    """
    import transformers

    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ImportError:
        classes = {"torchvision": transformers.CLIPImageProcessorFast, "pil": transformers.CLIPImageProcessor}
    else:
        classes = {"torchvision": transformers.CLIPImageProcessor, "pil": CLIPImageProcessorPil}
    return classes[backend]


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@IMAGE_KINDS
@pytest.mark.parametrize("size", SIZES)
def test_preprocessing_matches_clip_image_processor(pickscore_dirs, backend, size, sharp):
    """PickScore: the CLIP image processor it was published with, in both transformers backends."""
    processor = clip_image_processor_class(backend).from_pretrained(pickscore_dirs[1])
    image = sample_images(*size, sharp=sharp)
    official = processor(images=[to_pil(image[0])], return_tensors="pt").pixel_values[0]
    ours = resize_center_crop_normalize(image, **_clip_processor_preprocess(processor, "pickscore"))[0]
    assert_matches_uint8_pipeline(ours, official, OPENAI_CLIP_STD)


def test_crop_rounding_follows_each_library():
    """A margin of 3 pixels: torchvision crops from round(1.5) = 2, transformers from 3 // 2 = 1."""
    image = torch.arange(227 * 224, dtype=torch.float32).view(1, 1, 227, 224).expand(1, 3, -1, -1) / 1e5
    torchvision_crop = resize_center_crop_normalize(image, 224, (0, 0, 0), (1, 1, 1))
    transformers_crop = resize_center_crop_normalize(image, 224, (0, 0, 0), (1, 1, 1), crop_rounding="floor")
    assert torch.equal(torchvision_crop, image[..., 2:226, :])
    assert torch.equal(transformers_crop, image[..., 1:225, :])


# ----------------------------------------------------------------------------------------------------------
# HPSv2.


def official_hps_scores(model, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The official HPSv2 scorer's recipe (hpsv2/img_score.py), one image at a time, on PIL images."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    preprocess = official_hps_transform(cfg["size"][0], cfg["mean"], cfg["std"])
    tokenizer = open_clip.get_tokenizer(fixtures.TINY_OPEN_CLIP_NAME)
    scores = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            outputs = model(preprocess(to_pil(image)).unsqueeze(0), tokenizer([prompt]))
            logits_per_image = outputs["image_features"] @ outputs["text_features"].T
            scores.append(torch.diagonal(logits_per_image)[0])
    return torch.stack(scores)


def test_hps_loads_the_official_layout_and_scores_like_the_official_scorer(hps, open_clip_checkpoints):
    import open_clip

    checkpoint = torch.load(open_clip_checkpoints[0], weights_only=True)
    assert set(checkpoint) == {"state_dict"}
    official_model = open_clip.create_model(fixtures.TINY_OPEN_CLIP_NAME, pretrained=None, output_dict=True)
    official_model.load_state_dict(checkpoint["state_dict"])
    official_model.eval()

    # At the model's input size no resampling happens: the two pipelines see identical pixels.
    exact = sample_images(32, 32, count=5)
    scores = hps(exact, PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    assert bool(((scores >= -1) & (scores <= 1)).all())
    torch.testing.assert_close(scores, official_hps_scores(official_model, exact, PROMPTS), atol=1e-5, rtol=0)
    # Resampled and padded inputs: the official pipeline resamples floats too, so the scores agree as closely.
    for seed, size in enumerate([(48, 80), (80, 48), (720, 1280), (1024, 576), (300, 500), (64, 64)], start=1):
        resized = sample_images(*size, count=5, seed=seed)
        torch.testing.assert_close(
            hps(resized, PROMPTS),
            official_hps_scores(official_model, resized, PROMPTS),
            atol=1e-5,
            rtol=0,
            msg=lambda message, size=size: f"{size}: {message}",
        )
    assert hps._preprocess == dict(size=32, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)


def test_hps_batched_equals_one_by_one_and_loads_once(hps):
    images = sample_images(40, 56, count=5, seed=2)
    batched = hps(images, PROMPTS)
    model = hps._model
    one_by_one = torch.cat([hps(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=0)
    assert hps._model is model


@pytest.mark.parametrize("version, filename", [("v2.1", "HPS_v2.1_compressed.pt"), ("v2.0", "HPS_v2_compressed.pt")])
def test_hps_version_picks_the_hub_file(monkeypatch, open_clip_checkpoints, version, filename):
    import huggingface_hub

    requested = []

    def fake_download(repo_id, name, **kwargs):
        requested.append((repo_id, name))
        return str(open_clip_checkpoints[0])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    reward = HPSv2Reward(version, model_name=fixtures.TINY_OPEN_CLIP_NAME)
    assert reward.name == f"hps_{version}" and requested == []  # nothing loads before the first call
    reward(sample_images(32, 32), PROMPTS[:1])
    assert requested == [("xswu/HPSv2", filename)]


def test_hps_rejects_unknown_versions_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="HPS version must be one of"):
        HPSv2Reward("v3")
    reward = HPSv2Reward(checkpoint=str(tmp_path / "missing.pt"), model_name=fixtures.TINY_OPEN_CLIP_NAME)
    with pytest.raises(FileNotFoundError):
        reward(sample_images(32, 32), PROMPTS[:1])


def test_hps_in_bfloat16_returns_float32_close_to_float32(hps, open_clip_checkpoints):
    bf16 = HPSv2Reward(
        checkpoint=str(open_clip_checkpoints[0]), model_name=fixtures.TINY_OPEN_CLIP_NAME, dtype="bfloat16"
    )
    images = sample_images(32, 32, count=3)
    scores = bf16(images, PROMPTS[:3])
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, hps(images, PROMPTS[:3]), atol=0.05, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# CLIP score.


def test_clip_score_is_the_cosine_of_the_open_clip_checkpoint(open_clip_checkpoints):
    import open_clip

    path = str(open_clip_checkpoints[1])
    reward = CLIPScoreReward(fixtures.TINY_OPEN_CLIP_NAME, path, batch_size=3)
    scaled = CLIPScoreReward(fixtures.TINY_OPEN_CLIP_NAME, path, scale=2.5)
    images = sample_images(32, 32, count=5, seed=3)
    reference_model = open_clip.create_model(fixtures.TINY_OPEN_CLIP_NAME, pretrained=path).eval()
    tokens = open_clip.get_tokenizer(fixtures.TINY_OPEN_CLIP_NAME)(PROMPTS)
    pixels = (images - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        cosine = F.cosine_similarity(reference_model.encode_image(pixels), reference_model.encode_text(tokens))
    scores = reward(images, PROMPTS)
    assert reward.name == "clip_score" and scores.shape == (5,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, cosine, atol=1e-5, rtol=0)
    torch.testing.assert_close(scaled(images, PROMPTS), 2.5 * cosine.clamp(min=0), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="scale must be positive"):
        CLIPScoreReward(scale=0)


# ----------------------------------------------------------------------------------------------------------
# PickScore.


def official_pickscore_scores(model_dir, processor_dir, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """PickScore's published inference snippet (README), one prompt with its image at a time.

    The snippet's ``get_image_features``/``get_text_features`` are written out as what they compute in every
    transformers version (tower, pooled output, projection), since their return type changed in version 5.
    """
    from transformers import AutoProcessor, CLIPModel

    processor = AutoProcessor.from_pretrained(processor_dir)
    model = CLIPModel.from_pretrained(model_dir).eval()
    scores = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            image_inputs = processor(images=[to_pil(image)], return_tensors="pt")
            text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
            image_embs = model.visual_projection(model.vision_model(**image_inputs).pooler_output)
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.text_projection(model.text_model(**text_inputs).pooler_output)
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            scores.append(model.logit_scale.exp() * (text_embs @ image_embs.T)[0, 0])
    return torch.stack(scores)


def test_pickscore_scores_like_the_published_snippet(pickscore, pickscore_dirs):
    exact = sample_images(224, 224, count=5, seed=4)
    scores = pickscore(exact, PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    with torch.no_grad():
        logit_scale = pickscore._model.logit_scale.exp()
    assert bool((scores.abs() <= logit_scale).all())
    torch.testing.assert_close(scores, official_pickscore_scores(*pickscore_dirs, exact, PROMPTS), atol=1e-4, rtol=0)
    resized = sample_images(300, 260, count=5, seed=5)
    torch.testing.assert_close(
        pickscore(resized, PROMPTS), official_pickscore_scores(*pickscore_dirs, resized, PROMPTS), atol=0.05, rtol=0
    )


def test_pickscore_batched_equals_one_by_one(pickscore):
    """Prompts of different lengths are padded together in a batch; the scores must not notice."""
    images = sample_images(240, 224, count=5, seed=6)
    one_by_one = torch.cat([pickscore(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(pickscore(images, PROMPTS), one_by_one, atol=1e-4, rtol=0)


@pytest.mark.parametrize("returns", ["tensor", "output object"])
def test_pickscore_takes_either_return_type_of_the_feature_methods(pickscore_dirs, monkeypatch, returns):
    """``CLIPModel.get_image_features``/``get_text_features`` return the projected embeddings as a tensor in
    transformers 4.x and as the ``pooler_output`` of an output object in 5.x; whichever transformers is
    installed, the reward must score the same with both."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    reward = PickScoreReward(*map(str, pickscore_dirs))
    model = reward.model(torch.device("cpu"))

    def features_as(tower, projection):
        def get_features(**inputs):
            output = tower(**inputs)
            embeddings = projection(output.pooler_output)
            if returns == "tensor":
                return embeddings
            return BaseModelOutputWithPooling(last_hidden_state=output.last_hidden_state, pooler_output=embeddings)

        return get_features

    monkeypatch.setattr(model, "get_image_features", features_as(model.vision_model, model.visual_projection))
    monkeypatch.setattr(model, "get_text_features", features_as(model.text_model, model.text_projection))
    images = sample_images(224, 224, count=3, seed=9)
    torch.testing.assert_close(
        reward(images, PROMPTS[:3]), official_pickscore_scores(*pickscore_dirs, images, PROMPTS[:3]), atol=1e-4, rtol=0
    )


def test_pickscore_rejects_processors_it_cannot_reproduce():
    processor_class = clip_image_processor_class("pil")
    with pytest.raises(ValueError, match="supports CLIP image processors"):
        _clip_processor_preprocess(processor_class(do_center_crop=False), "pickscore")
    with pytest.raises(ValueError, match="supports CLIP image processors"):
        _clip_processor_preprocess(processor_class(resample=0), "pickscore")


# ----------------------------------------------------------------------------------------------------------
# ImageReward.


def reference_image_reward(
    sd: dict,
    pixels: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vision_heads: int,
    text_heads: int,
    med: dict,
) -> torch.Tensor:
    """ImageReward's forward written directly on the official state dict, after BLIP's vit.py and med.py.

    Independent of transformers: it checks that the key mapping puts every tensor where the official code
    uses it, with the official LayerNorm epsilons, attention masks and head.
    """

    def ln(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)

    def lin(x, name):
        return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def heads(x, count):  # [B, N, C] -> [B, count, N, C / count]
        return x.view(x.shape[0], x.shape[1], count, -1).transpose(1, 2)

    # BLIP ViT: patches + cls + positions, pre-norm blocks (LayerNorm eps 1e-6), final norm on all tokens.
    vit = "blip.visual_encoder"
    weight = sd[f"{vit}.patch_embed.proj.weight"]
    x = F.conv2d(pixels, weight, sd[f"{vit}.patch_embed.proj.bias"], stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[f"{vit}.cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[f"{vit}.pos_embed"]
    block = 0
    while f"{vit}.blocks.{block}.norm1.weight" in sd:
        name = f"{vit}.blocks.{block}"
        qkv = lin(ln(x, f"{name}.norm1", 1e-6), f"{name}.attn.qkv")
        q, k, v = (heads(part, vision_heads) for part in qkv.chunk(3, dim=-1))
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        x = x + lin(attention.transpose(1, 2).flatten(2), f"{name}.attn.proj")
        x = x + lin(F.gelu(lin(ln(x, f"{name}.norm2", 1e-6), f"{name}.mlp.fc1")), f"{name}.mlp.fc2")
        block += 1
    image_embeds = ln(x, f"{vit}.norm", 1e-6)

    # med.py BERT (post-norm), bidirectional self-attention with a padding mask, cross-attention to the image.
    bert, eps = "blip.text_encoder", med["layer_norm_eps"]
    t = sd[f"{bert}.embeddings.word_embeddings.weight"][input_ids]
    t = t + sd[f"{bert}.embeddings.position_embeddings.weight"][: input_ids.shape[1]]
    t = ln(t, f"{bert}.embeddings.LayerNorm", eps)
    padding = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0

    def bert_attention(hidden, context, name, mask):
        q, k, v = (
            heads(lin(src, f"{name}.self.{p}"), text_heads)
            for p, src in (("query", hidden), ("key", context), ("value", context))
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
        out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).flatten(2)
        return ln(lin(out, f"{name}.output.dense") + hidden, f"{name}.output.LayerNorm", eps)

    for layer in range(med["num_hidden_layers"]):
        name = f"{bert}.encoder.layer.{layer}"
        t = bert_attention(t, t, f"{name}.attention", padding)
        t = bert_attention(t, image_embeds, f"{name}.crossattention", 0.0)
        feed_forward = lin(F.gelu(lin(t, f"{name}.intermediate.dense")), f"{name}.output.dense")
        t = ln(feed_forward + t, f"{name}.output.LayerNorm", eps)

    # MLP head on [CLS] (no activations), then the official standardization.
    out = t[:, 0]
    for index in (0, 2, 4, 6, 7):
        out = lin(out, f"mlp.layers.{index}")
    return (out.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_image_reward_key_mapping_covers_the_official_layout_exactly(image_reward_files):
    """Every key of the official layout maps to a module key or is one of the four unused ones, and the
    mapped keys are exactly the module's keys: none missing, none unexpected."""
    official = torch.load(image_reward_files["checkpoint"], weights_only=True)
    model = ImageRewardReward(**image_reward_files).model(torch.device("cpu"))
    unused = {key for key in official if official_key_to_module_key(key) is None}
    assert unused == {
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
        "blip.text_encoder.embeddings.position_ids",
    }
    mapped = {official_key_to_module_key(key): key for key in official if key not in unused}
    assert set(mapped) == set(model.state_dict())
    for module_key, official_key in mapped.items():
        assert torch.equal(model.state_dict()[module_key], official[official_key]), official_key
    assert mapped["vision.encoder.layers.1.self_attn.projection.weight"] == (
        "blip.visual_encoder.blocks.1.attn.proj.weight"
    )
    assert mapped["text.encoder.layer.0.crossattention.self.key.weight"] == (
        "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"
    )
    assert mapped["head.4.bias"] == "mlp.layers.7.bias"
    with pytest.raises(KeyError):
        official_key_to_module_key("blip.itm_head.weight")


def test_image_reward_refuses_checkpoints_that_lack_a_weight(image_reward_files, tmp_path):
    state_dict = torch.load(image_reward_files["checkpoint"], weights_only=True)
    del state_dict["blip.visual_encoder.blocks.0.attn.qkv.bias"]
    torch.save(state_dict, tmp_path / "ImageReward.pt")
    reward = ImageRewardReward(**{**image_reward_files, "checkpoint": str(tmp_path / "ImageReward.pt")})
    with pytest.raises(
        ValueError,
        match="official ImageReward layout.*no value to 1 model weights.*vision.encoder.layers.0.self_attn.qkv.bias",
    ):
        reward(sample_images(224, 224), PROMPTS[:1])


def test_image_reward_ignores_and_logs_keys_it_does_not_use(image_reward, image_reward_files, tmp_path, caplog):
    """Like the official loader (``strict=False``), keys the model does not use are skipped: one outside the
    official layout (BLIP's image-text matching head) and one a mapping rule renames to no parameter (a
    pooler of the text encoder). Both are named in a warning; the known unused keys are not."""
    state_dict = torch.load(image_reward_files["checkpoint"], weights_only=True)
    state_dict["blip.itm_head.weight"] = torch.zeros(2, 32)
    state_dict["blip.text_encoder.pooler.dense.weight"] = torch.zeros(32, 32)
    torch.save(state_dict, tmp_path / "ImageReward.pt")
    reward = ImageRewardReward(**{**image_reward_files, "checkpoint": str(tmp_path / "ImageReward.pt")})
    images = sample_images(224, 224, count=2, seed=10)
    with caplog.at_level("WARNING", logger="trl_flow_egrpo.rewards.image_reward"):
        scores = reward(images, PROMPTS[:2])
    torch.testing.assert_close(scores, image_reward(images, PROMPTS[:2]), atol=0, rtol=0)
    (record,) = [r for r in caplog.records if r.name == "trl_flow_egrpo.rewards.image_reward"]
    assert record.levelname == "WARNING" and "ignoring 2 keys" in record.getMessage()
    assert "blip.itm_head.weight" in record.getMessage()
    assert "blip.text_encoder.pooler.dense.weight" in record.getMessage()
    assert "vision_proj" not in record.getMessage()


def test_image_reward_scores_like_the_official_model(image_reward, image_reward_files):
    exact = sample_images(224, 224, count=5, seed=7)
    scores = image_reward(exact, PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    assert scores.std() > 0.01  # the tiny model does tell the images apart

    tokenizer = image_reward._tokenizer
    text = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert text.input_ids.shape == (5, 35) and bool((text.input_ids[:, 0] == tokenizer.cls_token_id).all())
    assert {"[DEC]", "[ENC]"} <= set(tokenizer.all_special_tokens)
    pixels = (exact - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    med = json.loads(Path(image_reward_files["med_config"]).read_text())
    expected = reference_image_reward(
        torch.load(image_reward_files["checkpoint"], weights_only=True),
        pixels,
        text.input_ids,
        text.attention_mask,
        vision_heads=4,
        text_heads=4,
        med=med,
    )
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)


def test_image_reward_batched_equals_one_by_one(image_reward):
    images = sample_images(180, 260, count=5, seed=8)
    one_by_one = torch.cat([image_reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(image_reward(images, PROMPTS), one_by_one, atol=1e-4, rtol=0)


def test_image_reward_downloads_the_official_files(monkeypatch, image_reward_files):
    import huggingface_hub

    requested = []
    local = {"ImageReward.pt": image_reward_files["checkpoint"], "med_config.json": image_reward_files["med_config"]}

    def fake_download(repo_id, name, **kwargs):
        requested.append((repo_id, name))
        return local[name]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    reward = ImageRewardReward(
        tokenizer=image_reward_files["tokenizer"], vision_config=image_reward_files["vision_config"]
    )
    assert np.isfinite(reward(sample_images(224, 224), PROMPTS[:1]).numpy()).all()
    assert sorted(requested) == [("THUDM/ImageReward", "ImageReward.pt"), ("THUDM/ImageReward", "med_config.json")]
