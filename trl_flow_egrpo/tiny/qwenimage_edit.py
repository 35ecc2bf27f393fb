"""The tiny Qwen-Image-Edit pipeline."""

from __future__ import annotations

import torch

from .qwenimage import tiny_qwenimage_components


def build_tiny_qwenimage_edit_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``QwenImageEditPipeline`` with the tiny Qwen-Image components (:func:`tiny_qwenimage_components`: the same
    transformer, 3D VAE, scheduler and Qwen2.5-VL text encoder, whose vision tower reads the source image) and a
    ``Qwen2VLProcessor`` whose image processor keeps the text encoder's view of the source small (at most 4 vision
    tokens after merging), with a tokenizer that makes each word of the edit pipeline's template one token, except
    ``consistency``, which the byte-level merges split into letters (a word-built vocabulary cannot hold it once
    ``co`` is a token): the pipeline's 64 dropped tokens then end 10 tokens early, inside the system message. Parity
    with the pipeline does not depend on it (the adapter calls the pipeline's encoding).

    Args:
        seed: seeds the random weights, so the same seed gives the same pipeline.
        dtype: dtype of all components.

    Returns:
        A ``diffusers.QwenImageEditPipeline`` on the CPU with every component in eval mode. Sizes must be multiples
        of 16. The pipeline encodes the source at about one megapixel whatever the output size (1024x1024 for a
        square source: 4096 source tokens).
    """
    from diffusers import QwenImageEditPipeline
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    template = QwenImageEditPipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=None
    ).prompt_template_encode
    components = tiny_qwenimage_components(seed, template)
    # Patches of 14 pixels, 2x2 of them merged into one vision token: at most 56x56 pixels, 4 tokens.
    image_processor = Qwen2VLImageProcessor(
        min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = Qwen2VLProcessor(  # the processor class requires a video processor; the pipeline never uses it
        image_processor=image_processor, tokenizer=components["tokenizer"], video_processor=Qwen2VLVideoProcessor()
    )
    pipeline = QwenImageEditPipeline(processor=processor, **components)
    for module in (pipeline.transformer, pipeline.vae, pipeline.text_encoder):
        module.eval()
    return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)
