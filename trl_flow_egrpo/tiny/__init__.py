"""Tiny offline pipelines, one per model family, built in memory in milliseconds: the embedded default (a tiny FLUX.1
pipeline) and the test pipelines of every family the adapters support.

Each has random weights but the real architecture and latent layout of its family (latent channels, VAE factor,
token packing, guidance, scheduler config), so everything the trainer does on it is what it does on the real
model, at a size that trains on a CPU in a minute. Their tokenizers are built from in-memory vocabularies (bytes
plus a few merges for CLIP and the byte-level BPEs, characters for T5); they tokenize any text without downloading
anything.

The layout mirrors :mod:`trl_flow_egrpo.adapters`: one module per family (``flux``, ``sd3``, ``flux2`` [FLUX.2 [dev]
and [klein]], ``flux_kontext``, ``qwenimage``, ``qwenimage_edit``, ``zimage``, ``wan``) and ``common`` for the
tokenizers, VAE and text encoder that several families share. Every builder is re-exported here:
``from trl_flow_egrpo.tiny import build_tiny_sd3_pipeline``.
"""

from .common import tiny_clip_tokenizer, tiny_qwen_tokenizer, tiny_t5_tokenizer
from .flux import build_tiny_flux_pipeline
from .flux2 import build_tiny_flux2_klein_pipeline, build_tiny_flux2_pipeline, tiny_mistral3_processor
from .flux_kontext import build_tiny_flux_kontext_pipeline
from .qwenimage import build_tiny_qwenimage_pipeline
from .qwenimage_edit import build_tiny_qwenimage_edit_pipeline
from .sd3 import build_tiny_sd3_pipeline
from .wan import build_tiny_wan_pipeline
from .zimage import build_tiny_zimage_pipeline

__all__ = [
    "build_tiny_flux2_klein_pipeline",
    "build_tiny_flux2_pipeline",
    "build_tiny_flux_kontext_pipeline",
    "build_tiny_flux_pipeline",
    "build_tiny_qwenimage_edit_pipeline",
    "build_tiny_qwenimage_pipeline",
    "build_tiny_sd3_pipeline",
    "build_tiny_wan_pipeline",
    "build_tiny_zimage_pipeline",
    "tiny_clip_tokenizer",
    "tiny_mistral3_processor",
    "tiny_qwen_tokenizer",
    "tiny_t5_tokenizer",
]
