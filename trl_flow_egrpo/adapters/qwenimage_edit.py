"""Qwen-Image-Edit through ``diffusers.QwenImageEditPipeline``.

Qwen-Image-Edit is Qwen-Image's transformer, VAE and schedule conditioned on a source image in two ways:

- **Through the text encoder.** Qwen2.5-VL reads the instruction together with the source image (its vision
  tokens sit inside the prompt template); the embeddings keep the vision tokens, after the first 64 tokens of the
  template are dropped. The negative prompt is encoded with the same source image, so it is per prompt too.
- **Through the image tokens.** The source is VAE-encoded (the distribution's mode), normalized per channel and
  packed like the noisy latents; its tokens follow the noisy ones along the sequence, with their own entry in
  ``img_shapes`` for the 3-axis RoPE, and the velocity is the output's first ``N`` (noisy) tokens.

The pipeline resizes the source to about one megapixel with the source's aspect ratio
(``calculate_dimensions(1024 * 1024, width / height)``), whatever the output size. The adapter resizes every source
to the size that ratio gives for the run's ``width / height`` (so every prompt's conditioning has one shape) with the
pipeline's image processor; for a source with the output's aspect ratio, that is exactly what the pipeline does.
Guidance is Qwen-Image's: true CFG with a negative prompt and the per-token norm rescale.
"""

from __future__ import annotations

import torch

from .base import Conditioning, conditioning_with_negative
from .qwenimage import QwenImageAdapter

SOURCE_AREA = 1024 * 1024
"""The pixel area ``QwenImageEditPipeline`` resizes every source image to (for the source's aspect ratio)."""


class QwenImageEditAdapter(QwenImageAdapter):
    """Adapter for ``QwenImageEditPipeline`` (Qwen-Image-Edit; ``guidance_scale`` is ``true_cfg_scale``, default 4.0
    as the pipeline).

    :meth:`encode_prompts` takes each prompt's source image (RGB PIL images). ``pipeline(prompt, image=source,
    height=H, width=W, negative_prompt=..., true_cfg_scale=g)`` samples what the adapter samples when ``source`` has
    the output's aspect ratio. Prompt embeddings are padded to ``max_sequence_length`` plus the source's vision
    tokens (fixed by the source size), with the padding masked. Default LoRA targets: Qwen-Image's.
    """

    family = "qwenimage-edit"
    pipeline_class_names = ("QwenImageEditPipeline",)
    edits_images = True

    def __init__(
        self,
        pipeline,
        height: int,
        width: int,
        guidance_scale: float | None = None,
        max_sequence_length: int = 512,
        negative_prompt: str = "",
    ):
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        super().__init__(pipeline, height, width, guidance_scale, max_sequence_length, negative_prompt)
        self.source_width, self.source_height = calculate_dimensions(SOURCE_AREA, width / height)[:2]
        image_processor = pipeline.processor.image_processor
        grid = image_processor(images=[torch.zeros(3, self.source_height, self.source_width)], return_tensors="pt")
        self.num_vision_tokens = int(grid["image_grid_thw"].prod()) // image_processor.merge_size**2

    @classmethod
    def card_call_arguments(cls, config: dict) -> dict[str, str]:
        """Qwen-Image's, plus the source image resized as the trainer resizes it (the snippet loads it as
        ``source_image``)."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        arguments = super().card_call_arguments(config)
        width, height = calculate_dimensions(SOURCE_AREA, config["width"] / config["height"])[:2]
        arguments["image"] = f"pipe.image_processor.resize(source_image, {height}, {width})"
        return arguments

    @property
    def encoded_length(self) -> int:
        """``max_sequence_length`` text tokens plus the source image's vision tokens."""
        return self.max_sequence_length + self.num_vision_tokens

    @property
    def img_shapes(self) -> list[list[tuple[int, int, int]]]:
        """The token grids ``(frames, rows, columns)`` of the noisy image and of the source image."""
        source = (1, self.source_height // self.vae_scale_factor // 2, self.source_width // self.vae_scale_factor // 2)
        return [[(1, self.latent_height // 2, self.latent_width // 2), source]]

    def resized_sources(self, images: list) -> list:
        """Source images (RGB PIL) resized to the source size, with the pipeline's image processor."""
        return [self.pipeline.image_processor.resize(image, self.source_height, self.source_width) for image in images]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: list) -> Conditioning:
        """Qwen2.5-VL's embeddings of each prompt with its source image (and, with guidance, of the negative prompt
        with it), padded to :attr:`encoded_length`, plus ``image_latents`` ``[P, N, 64]``: the packed source."""
        if len(images) != len(prompts):
            raise ValueError(
                f"QwenImageEditAdapter needs one source image per prompt: {len(images)} for {len(prompts)}."
            )
        sources = self.resized_sources(images)
        conditioning = conditioning_with_negative(
            lambda texts: self._encode(texts, image=sources),
            prompts,
            self.negative_prompt if self.do_classifier_free_guidance else None,
        )
        conditioning["image_latents"] = self.source_latents(sources)
        return conditioning

    def source_latents(self, sources: list) -> torch.Tensor:
        """Packed, normalized VAE latents ``[B, N, 64]`` (float32) of resized sources, as the pipeline makes them."""
        height, width = self.source_height, self.source_width
        pixels = self.pipeline.image_processor.preprocess(sources, height, width).unsqueeze(2)  # one frame
        latents = self.pipeline._encode_vae_image(pixels.to(self.device, self.vae_dtype), generator=None)
        scale = self.vae_scale_factor
        return self.pipeline._pack_latents(
            latents, len(sources), self.num_channels, height // scale, width // scale
        ).to(torch.float32)

    def image_tokens(self, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The noisy tokens followed by the prompt's source-image tokens, along the sequence."""
        return torch.cat([latents, conditioning["image_latents"].to(latents.dtype)], dim=1)
