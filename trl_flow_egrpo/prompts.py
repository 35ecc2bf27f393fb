"""Prompt encoding without keeping the text encoders on the GPU: offloading and an on-disk embedding cache.

FLUX.1-dev's T5-XXL holds about 9 GiB in bf16, and it is needed for a fraction of a second per iteration.
:class:`PromptEncoder` keeps the text encoders in CPU memory and brings them to the GPU only to encode
(``offload=True``), and, given a ``cache_dir``, stores every prompt's embeddings on disk, one file per prompt
keyed by the model and the prompt: a prompt is encoded once, across iterations and across runs, and a run
whose prompts are all cached never touches the text encoders (precompute them with :meth:`PromptEncoder.warm`).
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from .adapters import Conditioning, ModelAdapter


class PromptEncoder:
    """``adapter.encode_prompts`` with text-encoder offloading and an optional on-disk cache.

    Args:
        adapter: the model family's adapter (its ``encode_prompts`` does the encoding).
        device: where the embeddings are returned (and where offloaded encoders visit to encode).
        offload: keep the text encoders on the CPU between encodings. Only acts when ``device`` is not the CPU.
        cache_dir: directory of cached embeddings, or None. Entries live in a subdirectory named by
            :meth:`model_key`, so several models (or sequence lengths) can share one directory.
    """

    def __init__(
        self, adapter: ModelAdapter, device: torch.device | str, offload: bool = True, cache_dir: str | None = None
    ):
        self.adapter = adapter
        self.device = torch.device(device)
        self.offload = offload and self.device.type != "cpu"
        self.cache_dir = None if cache_dir is None else os.path.join(cache_dir, self.model_key())
        self.num_encoded = 0
        """Prompts encoded by the text encoders so far (cache misses)."""
        if self.offload:
            self._move_encoders("cpu")

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The pipeline's text encoders (components named ``text_encoder*``)."""
        return [
            module
            for name, module in self.adapter.pipeline.components.items()
            if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)
        ]

    def model_key(self) -> str:
        """What the embeddings depend on besides the prompt, hashed: the pipeline's name or path, the text
        encoders' configs and a fingerprint of their weights (a pipeline built in memory has no name), the
        sequence length, and the family-specific encoding settings (SD3: negative prompt and guidance on/off)."""
        adapter = self.adapter
        description = {
            "pipeline": type(adapter.pipeline).__name__,
            "name_or_path": adapter.pipeline.config.get("_name_or_path"),
            "encoders": [
                module.config.to_dict() if hasattr(module.config, "to_dict") else str(module.config)
                for module in self.text_encoders
            ],
            "weights": [_fingerprint(module) for module in self.text_encoders],
            "max_sequence_length": adapter.max_sequence_length,
            "negative_prompt": adapter.negative_prompt,
            "guidance": adapter.guidance_scale if getattr(adapter, "do_classifier_free_guidance", False) else None,
        }
        blob = json.dumps(description, sort_keys=True, default=str).encode()
        return f"{adapter.family}-{hashlib.sha256(blob).hexdigest()[:16]}"

    def __call__(self, prompts: list[str], images: list | None = None) -> Conditioning:
        """The conditioning of ``prompts`` (one row per prompt, on ``device``), from the cache where it can.
        ``images``: each prompt's source image, for image-editing families (an entry is then keyed by the prompt
        and the image's pixels)."""
        if self.cache_dir is None:
            return self._encode(prompts, images)
        keys = (
            list(prompts)
            if images is None
            else [f"{p}\n{_image_digest(i)}" for p, i in zip(prompts, images, strict=True)]
        )
        first = {key: index for index, key in reversed(list(enumerate(keys)))}  # each key's first row
        cached = {key: self._load(key) for key in first}
        missing = [key for key, rows in cached.items() if rows is None]
        if missing:
            encoded = self._encode(
                [prompts[first[key]] for key in missing],
                None if images is None else [images[first[key]] for key in missing],
            )
            for i, key in enumerate(missing):
                cached[key] = {name: tensor[i : i + 1] for name, tensor in encoded.items()}
                self._store(key, cached[key])
        return {name: torch.cat([cached[key][name] for key in keys]).to(self.device) for name in cached[keys[0]]}

    def warm(self, prompts, batch_size: int = 16, images: list | None = None) -> int:
        """Encode and cache every prompt of ``prompts`` (with its source image of ``images``, for an image-editing
        family) not cached yet; returns how many were encoded."""
        if self.cache_dir is None:
            raise ValueError("PromptEncoder.warm needs a cache_dir (EGRPOConfig.prompt_cache_dir).")
        before = self.num_encoded
        if images is None:
            prompts = list(dict.fromkeys(prompts))
        for start in range(0, len(prompts), batch_size):
            self(prompts[start : start + batch_size], None if images is None else images[start : start + batch_size])
        return self.num_encoded - before

    def _encode(self, prompts: list[str], images: list | None) -> Conditioning:
        if self.offload:
            self._move_encoders(self.device)
        try:
            conditioning = (
                self.adapter.encode_prompts(prompts) if images is None else self.adapter.encode_prompts(prompts, images)
            )
        finally:
            if self.offload:
                self._move_encoders("cpu")
        self.num_encoded += len(prompts)
        return {name: tensor.to(self.device) for name, tensor in conditioning.items()}

    def _move_encoders(self, device) -> None:
        for module in self.text_encoders:
            module.to(device)

    def _path(self, prompt: str) -> str:
        digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
        return os.path.join(self.cache_dir, digest[:2], f"{digest}.safetensors")

    def _load(self, prompt: str) -> Conditioning | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._path(prompt)
        if not os.path.isfile(path):
            return None
        try:
            return load_file(path)
        except (SafetensorError, OSError):  # a damaged entry (e.g. a crash while writing): encode again
            return None

    def _store(self, prompt: str, rows: Conditioning) -> None:
        from safetensors.torch import save_file

        path = self._path(prompt)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        staging = f"{path}.{os.getpid()}.tmp"  # written whole, then renamed: readers never see half a file
        save_file(
            {name: tensor.detach().contiguous().cpu() for name, tensor in rows.items()},
            staging,
            metadata={"prompt": prompt},
        )
        os.replace(staging, path)


def _image_digest(image) -> str:
    """A digest of a PIL image's size and pixels (an edit prompt's cache entry depends on its source image)."""
    return hashlib.sha256(repr(image.size).encode() + image.tobytes()).hexdigest()


def _fingerprint(module: torch.nn.Module) -> list[float]:
    """A cheap summary of a module's weights: the sum of its first and last parameter tensors."""
    parameters = list(module.parameters())
    if not parameters:
        return []
    return [float(parameters[0].detach().float().sum()), float(parameters[-1].detach().float().sum())]
