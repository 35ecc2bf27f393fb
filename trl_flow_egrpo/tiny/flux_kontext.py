"""The tiny FLUX.1 Kontext pipeline."""

from __future__ import annotations

import torch

from .flux import build_tiny_flux_pipeline


def build_tiny_flux_kontext_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``FluxKontextPipeline`` with the tiny FLUX.1 pipeline's components (:func:`build_tiny_flux_pipeline`).

    FLUX.1 Kontext [dev] has FLUX.1-dev's architecture (the same transformer class, VAE, text encoders and
    dynamically shifting scheduler, with the guidance embedding); only the pipeline differs: it encodes a source
    image with the VAE and appends its packed tokens to the noisy ones. So the tiny FLUX.1 components are the tiny
    Kontext model.

    Args:
        seed: seeds the random weights, so the same seed gives the same pipeline.
        dtype: dtype of all components.

    Returns:
        A ``diffusers.FluxKontextPipeline`` on the CPU with every component in eval mode; sizes must be multiples of
        16 (64x64: 16 image tokens, plus 16 source-image tokens).
    """
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**build_tiny_flux_pipeline(seed, dtype).components)
