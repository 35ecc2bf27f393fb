"""Rewards by name, for command lines and recipes (``--reward_funcs hps clip``).

The example scripts and the model card share this table, so a name means the same reward (and the same
checkpoint) everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

from .rewards import (
    BrightnessReward,
    CLIPScoreReward,
    ColorReward,
    EditConsistencyReward,
    FrameAverageReward,
    HPSv2Reward,
    ImageRewardReward,
    JpegCompressibilityReward,
    JpegIncompressibilityReward,
    OCRReward,
    PickScoreReward,
    TemporalConsistencyReward,
)

REWARDS: dict[str, Callable[..., Callable]] = {
    "hps": HPSv2Reward,
    "clip": CLIPScoreReward,
    "pickscore": PickScoreReward,
    "image_reward": ImageRewardReward,
    "ocr": OCRReward,
    "jpeg_compressibility": JpegCompressibilityReward,
    "jpeg_incompressibility": JpegIncompressibilityReward,
    "color": ColorReward,
    "brightness": BrightnessReward,
    "temporal_consistency": TemporalConsistencyReward,
    "edit_consistency": EditConsistencyReward,
}
"""Command-line name -> reward class (built with its defaults: the checkpoints of :data:`REWARD_SOURCES`)."""

VIDEO_FRAMES_PREFIX = "frames_"
"""``frames_<name>``: the image reward ``<name>`` averaged over a video's frames (``--reward_funcs frames_hps``)."""

REWARD_SOURCES: dict[str, str] = {
    "hps_v2.1": "HPSv2.1: open_clip ViT-H-14, checkpoint `HPS_v2.1_compressed.pt` of the Hub repo `xswu/HPSv2`",
    "hps_v2.0": "HPSv2.0: open_clip ViT-H-14, checkpoint `HPS_v2_compressed.pt` of the Hub repo `xswu/HPSv2`",
    "clip_score": "CLIP score: cosine similarity of open_clip ViT-H-14 `laion2b_s32b_b79k` embeddings",
    "pickscore": "PickScore v1: `yuvalkirstain/PickScore_v1` with the `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` "
    "processor",
    "image_reward": "ImageReward v1.0: `ImageReward.pt` of the Hub repo `THUDM/ImageReward`",
    "ocr": "OCR (Flow-GRPO's text rendering): 1 - normalized edit distance of the text PP-OCRv4 reads (the weights "
    "of the `rapidocr-onnxruntime` wheel) to the prompt's quoted text",
    "jpeg_compressibility": "JPEG compressibility (weight-free): minus the JPEG size in kB at quality 95",
    "jpeg_incompressibility": "JPEG incompressibility (weight-free): the JPEG size in kB at quality 95",
    "color": "Colour (weight-free): minus the distance of the mean RGB colour to a target (default red)",
    "brightness": "Brightness (weight-free): the mean pixel value",
    "temporal_consistency": "Temporal consistency of videos (weight-free): minus the mean absolute difference of "
    "consecutive frames",
    "edit_consistency": "Edit consistency (weight-free): how much of the source image an edit keeps outside its edit "
    "region and changes inside it, in [0, 1]",
}
"""A reward's logged name (its ``name`` attribute) -> what it is and which weights it uses by default."""


def build_reward(name: str, **kwargs) -> Callable:
    """The reward registered as ``name`` in :data:`REWARDS`, built with ``kwargs`` (e.g. ``dtype``,
    ``checkpoint``: see the reward's class).

    Model-based rewards load their weights on first call, so building one is instant and offline. For videos,
    ``frames_<name>`` is the image reward ``<name>`` averaged over frames (:class:`FrameAverageReward`), built with
    ``kwargs``.

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    if name.startswith(VIDEO_FRAMES_PREFIX) and name.removeprefix(VIDEO_FRAMES_PREFIX) in REWARDS:
        return FrameAverageReward(build_reward(name.removeprefix(VIDEO_FRAMES_PREFIX), **kwargs))
    if name not in REWARDS:
        raise ValueError(
            f"Unknown reward {name!r}. Known rewards: {', '.join(REWARDS)}. Custom rewards are any "
            "callable fn(images, prompts, **columns) passed to EGRPOTrainer directly."
        )
    return REWARDS[name](**kwargs)


def describe_reward(name: str) -> str:
    """What the reward logged as ``name`` is (with its default checkpoint), for model cards and reports.
    Rewards not in :data:`REWARD_SOURCES` (custom ones) are described by their name alone."""
    base = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name  # "clip_score_1" repeats
    if base.startswith(VIDEO_FRAMES_PREFIX):
        return "Frame average (video) of " + describe_reward(base.removeprefix(VIDEO_FRAMES_PREFIX))
    return REWARD_SOURCES.get(base, f"`{name}` (custom reward)")


TINY_PIPELINES = {
    "tiny": "build_tiny_flux_pipeline",
    "tiny-sd3": "build_tiny_sd3_pipeline",
    "tiny-flux2": "build_tiny_flux2_pipeline",
    "tiny-flux2-klein": "build_tiny_flux2_klein_pipeline",
    "tiny-qwenimage": "build_tiny_qwenimage_pipeline",
    "tiny-wan": "build_tiny_wan_pipeline",
    "tiny-zimage": "build_tiny_zimage_pipeline",
    "tiny-flux-kontext": "build_tiny_flux_kontext_pipeline",
    "tiny-qwenimage-edit": "build_tiny_qwenimage_edit_pipeline",
}
"""Pipeline names that build an embedded tiny pipeline (:mod:`trl_flow_egrpo.tiny`) instead of loading one."""


def load_pipeline(name: str, dtype, main_process_weights_only: bool = False, quantization_config=None):
    """The diffusers pipeline ``name`` (Hub id or local path) in ``dtype``; the names of :data:`TINY_PIPELINES`
    (``"tiny"``, ``"tiny-sd3"``, ``"tiny-flux2"``, ``"tiny-wan"``, ``"tiny-zimage"``, ...) build the embedded
    tiny pipeline of that family offline, so scripts run the same code path on a CPU.

    Args:
        name: the pipeline.
        dtype: its torch dtype.
        quantization_config: handed to ``from_pretrained`` (e.g.
            :func:`~trl_flow_egrpo.quantization.nf4_pipeline_quantization_config`); refused for the tiny pipelines,
            which are built, not loaded.
        main_process_weights_only: for a pipeline handed to ``EGRPOTrainer``: when launched with FSDP and
            ``fsdp_cpu_ram_efficient_loading: true``, only the main process loads the transformer's weights;
            the others get a placeholder of the same shapes (:func:`~trl_flow_egrpo.backends.placeholder_model`),
            which the trainer's ``accelerator.prepare`` fills with the main process's weights while sharding. A
            machine then holds one copy of the transformer in RAM, not one per GPU. Anywhere else (a script that
            samples with the pipeline itself) the placeholder would be used as it is: leave this False.
    """
    from . import backends

    placeholder = main_process_weights_only and backends.placeholder_weights_requested()
    if name in TINY_PIPELINES:
        if quantization_config is not None:
            raise ValueError(
                f"{name!r} is built in memory, so it cannot be loaded quantized: use "
                "quantization='int8-weight-only' (applied by the trainer) with the tiny pipelines."
            )
        from . import tiny

        pipeline = getattr(tiny, TINY_PIPELINES[name])(dtype=dtype)
        if placeholder:
            transformer = pipeline.transformer
            pipeline.transformer = backends.placeholder_model(type(transformer), transformer.config, dtype)
        return pipeline
    import diffusers

    if not placeholder:
        return diffusers.DiffusionPipeline.from_pretrained(
            name, torch_dtype=dtype, quantization_config=quantization_config
        )
    _, class_name = diffusers.DiffusionPipeline.load_config(name)["transformer"]
    transformer_class = getattr(diffusers, class_name)
    transformer = backends.placeholder_model(
        transformer_class, transformer_class.load_config(name, subfolder="transformer"), dtype
    )
    return diffusers.DiffusionPipeline.from_pretrained(name, torch_dtype=dtype, transformer=transformer)
