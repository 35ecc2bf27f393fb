"""FLUX.1 Kontext (image editing) through ``diffusers.FluxKontextPipeline``.

Kontext is FLUX.1-dev's architecture (packed 2x2 latent tokens, ``timestep / 1000``, the distilled guidance
embedding, dynamic shift) conditioned on a source image as well as the prompt:

- **The source image** is resized to the run's ``height`` x ``width`` (with the pipeline's image processor, so the
  conditioning keeps one shape for every prompt), encoded once per prompt with the VAE's mode (the pipeline's
  ``sample_mode="argmax"``: deterministic), normalized (``scaling_factor``, ``shift_factor``) and packed like the
  noisy latents. Those tokens live in the conditioning (``image_latents``, one row per prompt).
- **The transformer** sees the noisy tokens followed by the source tokens along the sequence, with position ids
  that are the noisy tokens' grid with the first coordinate set to 1 (the noisy ones have 0); the velocity is the
  output's first ``N`` tokens (``N`` noisy tokens). The source tokens are never noised: they are conditioning.
- **The schedule's** ``mu`` counts the noisy tokens only, as the pipeline does.

The pipeline's optional true CFG (``true_cfg_scale`` with a negative prompt, a second pass on top of the guidance
embedding) is not supported: like FLUX.1-dev, the adapter samples with the guidance embedding only, and refuses a
negative prompt.
"""

from __future__ import annotations

import torch

from .base import Conditioning
from .flux import FluxAdapter


class FluxKontextAdapter(FluxAdapter):
    """Adapter for ``FluxKontextPipeline`` (FLUX.1 Kontext [dev]; guidance embedding, default 3.5 as the pipeline).

    :meth:`encode_prompts` takes each prompt's source image (RGB PIL images). ``pipeline(prompt, image=source,
    height=H, width=W, max_area=H * W, _auto_resize=False, guidance_scale=g)`` samples what the adapter samples
    when ``source`` already has the run's size ``W x H``: without ``max_area`` the pipeline rescales the output
    to about one megapixel, and without ``_auto_resize=False`` it resizes the source to its preferred Kontext
    resolution.

    The default LoRA targets are FLUX.1's (the transformer is the same class).
    """

    family = "flux-kontext"
    pipeline_class_names = ("FluxKontextPipeline",)
    edits_images = True

    @classmethod
    def card_call_arguments(cls, config: dict) -> dict[str, str]:
        """FLUX.1's, plus the source image resized to the run's size as the trainer resizes it (the pipeline's image
        processor; the snippet loads it as ``source_image``), kept at that size (``_auto_resize=False``), and the output
        size kept (``max_area``)."""
        arguments = super().card_call_arguments(config)
        height, width = config.get("height"), config.get("width")
        arguments["image"] = f"pipe.image_processor.resize(source_image, {height}, {width})"
        arguments["_auto_resize"] = "False"
        arguments["max_area"] = repr(height * width)
        return arguments

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: list) -> Conditioning:
        """FLUX.1's prompt embeddings plus ``image_latents`` ``[P, N, 64]``: each prompt's source image (an RGB
        PIL image, resized to the run's size) VAE-encoded and packed."""
        if len(images) != len(prompts):
            raise ValueError(f"FluxKontextAdapter needs one source image per prompt: {len(images)} for {len(prompts)}.")
        conditioning = super().encode_prompts(prompts)
        conditioning["image_latents"] = self.source_latents(images)
        return conditioning

    def source_latents(self, images: list) -> torch.Tensor:
        """Packed, normalized VAE latents ``[B, N, 64]`` (float32) of source images, as the pipeline makes them for
        ``_auto_resize=False`` and images of the run's size."""
        pixels = self.pipeline.image_processor.preprocess(images, self.height, self.width)  # resized to the run's size
        latents = self.pipeline._encode_vae_image(pixels.to(self.device, self.vae_dtype), generator=None)
        return self.pipeline._pack_latents(
            latents, len(images), self.num_channels, self.latent_height, self.latent_width
        ).to(torch.float32)

    def image_token_ids(self, device, dtype) -> torch.Tensor:
        """The noisy tokens' position ids, then the source tokens': the same grid with the first coordinate 1."""
        noisy = super().image_token_ids(device, dtype)
        source = noisy.clone()
        source[:, 0] = 1
        return torch.cat([noisy, source])

    def image_tokens(self, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The noisy tokens followed by the prompt's source-image tokens, along the sequence."""
        return torch.cat([latents, conditioning["image_latents"].to(latents.dtype)], dim=1)
