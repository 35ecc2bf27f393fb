"""Model adapters: one file per model family, registered in :data:`ADAPTERS`."""

from __future__ import annotations

from .base import Conditioning, ModelAdapter, select_rows
from .flux import FluxAdapter
from .flux2 import Flux2Adapter
from .flux_kontext import FluxKontextAdapter
from .qwenimage import QwenImageAdapter
from .qwenimage_edit import QwenImageEditAdapter
from .sd3 import SD3Adapter
from .wan import WanAdapter
from .zimage import ZImageAdapter

ADAPTERS: list[type[ModelAdapter]] = [
    FluxAdapter,
    SD3Adapter,
    Flux2Adapter,
    QwenImageAdapter,
    WanAdapter,
    ZImageAdapter,
    FluxKontextAdapter,
    QwenImageEditAdapter,
]
"""Adapter classes tried in order by :func:`get_adapter`."""


def get_adapter(pipeline, num_frames: int | None = None, **kwargs) -> ModelAdapter:
    """The adapter for ``pipeline``, built with ``kwargs`` (see :class:`ModelAdapter`); ``num_frames`` goes to
    video adapters (None: the family's default) and must be None for image pipelines.

    Raises:
        ValueError: no adapter supports this pipeline class (the message lists the supported ones), or
            ``num_frames`` was given for an image pipeline.
    """
    for adapter_class in ADAPTERS:
        if adapter_class.supports(pipeline):
            if adapter_class.is_video:
                return adapter_class(pipeline, num_frames=num_frames, **kwargs)
            if num_frames is not None:
                raise ValueError(
                    f"num_frames={num_frames}: {type(pipeline).__name__} generates images, not videos. "
                    "Leave EGRPOConfig.num_frames unset (None); it is for video pipelines (WanPipeline)."
                )
            return adapter_class(pipeline, **kwargs)
    supported = ", ".join(name for cls in ADAPTERS for name in cls.pipeline_class_names)
    raise ValueError(
        f"E-GRPO does not support {type(pipeline).__name__}. Supported pipelines: {supported}. "
        "Load one of them (e.g. `FluxPipeline.from_pretrained('black-forest-labs/FLUX.1-dev')`), "
        "or add an adapter for your model family (docs/adding-a-model.md)."
    )


__all__ = [
    "ADAPTERS",
    "Conditioning",
    "Flux2Adapter",
    "FluxAdapter",
    "FluxKontextAdapter",
    "ModelAdapter",
    "QwenImageAdapter",
    "QwenImageEditAdapter",
    "SD3Adapter",
    "WanAdapter",
    "ZImageAdapter",
    "get_adapter",
    "select_rows",
]
