"""The model-adapter interface: everything the trainer needs from a model family.

The trainer and the rollout engine never touch a pipeline's internals; they go through a
:class:`ModelAdapter`. Adding a model family is one new file implementing this class (see
``docs/adding-a-model.md``), registered in ``trl_flow_egrpo/adapters/__init__.py``.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..schedule import Schedule, dynamic_shift_mu, scheduler_schedule

Conditioning = dict[str, torch.Tensor]
"""Per-prompt conditioning: a dict of tensors whose first dimension is the prompt batch."""


def select_rows(conditioning: Conditioning, rows: torch.Tensor) -> Conditioning:
    """The conditioning of the prompts ``rows`` (a LongTensor of prompt indices, repeats allowed)."""
    return {name: tensor.index_select(0, rows.to(tensor.device)) for name, tensor in conditioning.items()}


def conditioning_with_negative(encode, prompts: list[str], negative_prompt: str | None) -> Conditioning:
    """``prompt_embeds`` and ``prompt_embeds_mask`` of ``prompts`` from ``encode(prompts) -> (embeds, mask)``, and
    with a ``negative_prompt`` (None: no guidance) the ``negative_*`` pair, one row per prompt so that
    :func:`select_rows` indexes both alike."""
    embeds, mask = encode(prompts)
    conditioning = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
    if negative_prompt is not None:
        embeds, mask = encode([negative_prompt] * len(prompts))
        conditioning.update(negative_prompt_embeds=embeds, negative_prompt_embeds_mask=mask)
    return conditioning


def unnormalize_wan_vae_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """``latents * std + mean`` per channel of a Wan-style 3D VAE (``latents_mean`` / ``latents_std`` in its
    config; Wan and Qwen-Image), in the pipelines' order of operations (divide by ``1 / std``): what its decoder
    takes. ``latents`` is ``[B, C, F, h, w]``."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    return latents / inverse_std + mean


class ModelAdapter(ABC):
    """What E-GRPO needs from a text-to-image flow-matching pipeline.

    Subclasses set the class attributes (:attr:`family`, :attr:`pipeline_class_names`,
    :attr:`transformer_class_name`, :attr:`default_lora_target_modules`, :attr:`default_guidance_scale`), and
    implement :attr:`patch_size` and the abstract methods. The base class checks the image size, derives the
    latent grid and builds the schedule. Latents handed between methods are float32 and laid out the way the model
    consumes them (packed for FLUX, ``[B, C, h, w]`` for SD3).

    Args:
        pipeline: the diffusers pipeline; its transformer is the trained module.
        height: image height in pixels.
        width: image width in pixels.
        guidance_scale: the family's guidance (FLUX.1-dev: the distilled guidance embedding; SD3:
            classifier-free guidance). ``None`` uses the family's default.
        max_sequence_length: T5 token length of the prompt encoding.
        negative_prompt: for families with classifier-free guidance.
    """

    family: ClassVar[str] = ""
    """Short name of the model family (``"flux"``, ``"sd3"``): logs, Hub tags, the model card."""
    pipeline_class_names: ClassVar[tuple[str, ...]] = ()
    """diffusers pipeline classes this adapter drives; the first is the one the model card loads with."""
    transformer_class_name: ClassVar[str] = ""
    """diffusers class of the family's denoiser (a full fine-tune is saved and loaded as it)."""
    default_lora_target_modules: ClassVar[tuple[str, ...]] = ()
    default_guidance_scale: ClassVar[float] = 1.0
    """The guidance used when ``guidance_scale`` is None."""
    default_max_shift: ClassVar[float] = 1.15
    """``max_shift`` of a dynamically shifting scheduler whose config omits it (as the family's pipeline)."""
    supports_negative_prompt: ClassVar[bool] = True
    """Whether the family's pipeline can have a negative-prompt pass (classifier-free guidance). False for a
    guidance-distilled family without one (FLUX.1): the trainer then refuses a ``negative_prompt`` rather than
    ignore it."""
    edits_images: ClassVar[bool] = False
    """Whether the family edits a source image (FLUX.1 Kontext, Qwen-Image-Edit). Its :meth:`encode_prompts` then
    takes ``(prompts, images)``, one RGB ``PIL.Image`` per prompt, which the trainer loads from the dataset's
    ``EGRPOConfig.image_column``; the source image's encoding lives in the conditioning, one row per prompt."""
    is_video: ClassVar[bool] = False
    """Whether the family generates videos: its adapter then takes ``num_frames`` and decodes ``[B, F, 3, H, W]``."""

    def __init__(
        self,
        pipeline,
        height: int,
        width: int,
        guidance_scale: float | None = None,
        max_sequence_length: int = 512,
        negative_prompt: str = "",
    ):
        self.pipeline = pipeline
        multiple = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % multiple:
                below, above = (
                    max(multiple, value // multiple * multiple),
                    max(multiple, -(-value // multiple) * multiple),
                )
                options = str(below) if below == above else f"{below} or {above}"
                raise ValueError(
                    f"{name}={value}: {type(self).__name__.removesuffix('Adapter')} needs image sizes "
                    f"that are positive multiples of {multiple} (the VAE's downsampling times the "
                    f"transformer's patch size). Set EGRPOConfig.{name} to e.g. {options}."
                )
        self.height = height
        self.width = width
        # The VAE's latent grid, before any patching or packing.
        self.latent_height = height // self.vae_scale_factor
        self.latent_width = width // self.vae_scale_factor
        self.guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        self.max_sequence_length = max_sequence_length
        self.negative_prompt = negative_prompt

    @property
    @abstractmethod
    def patch_size(self) -> int:
        """Side of the latent patch that becomes one transformer token."""

    guidance_argument: ClassVar[str] = "guidance_scale"
    """The keyword of the family pipeline's ``__call__`` that takes ``guidance_scale`` (the model card's snippet)."""

    @classmethod
    def pipeline_call_arguments(cls, config: dict) -> dict:
        """Keyword arguments with which the family pipeline's ``__call__`` samples as a run with ``config`` (an
        ``EGRPOConfig.to_dict()``) did: steps, size, frames, guidance and negative prompt. For the model card."""
        arguments = {name: config.get(name) for name in ("num_inference_steps", "height", "width")}
        if cls.is_video and config.get("num_frames") is not None:
            arguments["num_frames"] = config["num_frames"]
        if config.get("guidance_scale") is not None:
            arguments[cls.guidance_argument] = config["guidance_scale"]
        if config.get("negative_prompt"):
            arguments["negative_prompt"] = config["negative_prompt"]
        return arguments

    @classmethod
    def sampling_scheduler_code(cls, shift: float | None) -> str | None:
        """Python for the scheduler that makes the family pipeline sample with the trained schedule (``pipe`` is
        the pipeline; ``FlowMatchEulerDiscreteScheduler`` is imported), or None when the pipeline's own one does:
        with a static ``shift``, its Euler scheduler with that shift and no dynamic shifting."""
        if shift is None:
            return None
        return (
            "FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, "
            f"shift={shift}, use_dynamic_shifting=False)"
        )

    card_imports: ClassVar[tuple[str, ...]] = ()
    """Import lines (other than torch and diffusers) that :meth:`card_call_arguments`' code needs."""

    @classmethod
    def card_call_arguments(cls, config: dict) -> dict[str, str]:
        """Python source of each keyword argument with which the model card's snippet calls the family pipeline
        (``pipe`` and ``device`` are defined there) so that, from the trainer's initial noise, it samples as
        ``trainer.sample_images`` did in a run with ``config`` (an ``EGRPOConfig.to_dict()``).

        :meth:`pipeline_call_arguments`, plus what a plain call would take from the pipeline's own defaults: the
        guidance the adapter used (the family's default where the run left it None: SD3's pipeline defaults to
        7.0, the adapter to 4.5) and the prompt encoding's ``max_sequence_length`` (the pipelines default to 512 or
        256 tokens, which encodes prompts differently)."""
        arguments = {name: repr(value) for name, value in cls.pipeline_call_arguments(config).items()}
        guidance = config.get("guidance_scale")
        arguments[cls.guidance_argument] = repr(cls.default_guidance_scale if guidance is None else guidance)
        arguments["max_sequence_length"] = repr(config.get("max_sequence_length"))
        return arguments

    @property
    def vae_scale_factor(self) -> int:
        """The VAE's spatial downsampling (the pipeline's ``vae_scale_factor``; video pipelines name it otherwise)."""
        return self.pipeline.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this: the VAE's downsampling times the patch size."""
        return self.vae_scale_factor * self.patch_size

    @property
    def num_image_tokens(self) -> int:
        """Image tokens the transformer sees (what a dynamically shifting schedule depends on)."""
        return (self.latent_height // self.patch_size) * (self.latent_width // self.patch_size)

    @classmethod
    def supports(cls, pipeline) -> bool:
        """Whether this adapter drives ``pipeline`` (by class name, so subclasses and wrappers of the
        same pipeline class match without importing every family's module)."""
        return any(klass.__name__ in cls.pipeline_class_names for klass in type(pipeline).__mro__)

    @property
    def transformer(self) -> torch.nn.Module:
        """The denoiser that E-GRPO trains."""
        return self.pipeline.transformer

    @property
    def device(self) -> torch.device:
        """Where the denoiser lives."""
        return next(self.transformer.parameters()).device

    @property
    def transformer_rows_per_evaluation(self) -> int:
        """Rows of the transformer's forward batches per velocity evaluation (per trajectory row of
        :meth:`velocity`): 2 with true classifier-free guidance (a conditional and a negative row), else 1.
        MFU and the logged ``transformer_rows`` count these rows."""
        return 2 if getattr(self, "do_classifier_free_guidance", False) else 1

    _phase_reads: dict[str, torch.dtype] | None = None  # what this phase has read, None outside a phase

    @contextlib.contextmanager
    def phase(self):
        """Within ``with adapter.phase():`` (a sampling phase, an update, a decoding), :attr:`transformer_dtype`
        and :attr:`vae_dtype` are read once, at their first use, instead of at every call.

        diffusers' ``ModelMixin.dtype`` walks every submodule (milliseconds per read on a LoRA-wrapped
        transformer), and :meth:`velocity` and :meth:`decode` run per batch. A nested phase keeps the outer one's
        reads. Each phase reads afresh, so a cast (``.to(dtype)``, mixed precision, a LoRA added) between phases is
        seen; casting the model inside a phase is not.
        """
        if self._phase_reads is not None:
            yield
            return
        self._phase_reads = {}
        try:
            yield
        finally:
            self._phase_reads = None

    def _read_once_per_phase(self, name: str, read) -> torch.dtype:
        """``read()``, or inside :meth:`phase` the value its first call in this phase returned."""
        reads = self._phase_reads
        if reads is None:
            return read()
        if name not in reads:
            reads[name] = read()
        return reads[name]

    @property
    def transformer_dtype(self) -> torch.dtype:
        """The transformer's dtype (what :meth:`velocity` casts the latents to), read once per :meth:`phase`."""
        return self._read_once_per_phase("transformer", lambda: self.transformer.dtype)

    @property
    def vae_dtype(self) -> torch.dtype:
        """The VAE's dtype (what decoding casts the latents to), read once per :meth:`phase`."""
        return self._read_once_per_phase("vae", lambda: self.pipeline.vae.dtype)

    @property
    def frozen_modules(self) -> list[torch.nn.Module]:
        """The modules that are never trained (VAE, text encoders): kept frozen and in eval mode."""
        return [
            module
            for name, module in self.pipeline.components.items()
            if isinstance(module, torch.nn.Module) and name != "transformer"
        ]

    def schedule(self, num_steps: int, shift: float | None) -> Schedule:
        """The sampling schedule: ``linspace(1, 1/T, T)`` shifted by a static ``shift``, or the scheduler's own
        when ``shift`` is None (with ``mu`` for this resolution, as the pipeline computes it, if the scheduler
        shifts dynamically: FLUX.1-dev)."""
        config = self.pipeline.scheduler.config
        mu = None
        if config.get("use_dynamic_shifting", False):
            mu = dynamic_shift_mu(
                self.num_image_tokens,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", self.default_max_shift),
            )
        return scheduler_schedule(self.pipeline.scheduler, num_steps, shift=shift, mu=mu)

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Encode prompts once; the result is indexed per rollout with :func:`select_rows`."""

    @abstractmethod
    def initial_noise(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Standard normal initial latents (float32, model layout), drawn as the pipeline draws them."""

    @abstractmethod
    def velocity(
        self, model: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        """The policy's velocity for a batch with per-sample timesteps, as float32.

        Args:
            model: the (possibly wrapped) denoiser to call; the trainer passes its prepared module.
            latents: float32 latents ``[B, ...]``.
            timesteps: ``[B]`` schedule timesteps (``Schedule.timesteps`` entries).
            conditioning: ``B`` rows of :meth:`encode_prompts` output.
        """

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents to float32 images ``[B, 3, H, W]`` in [0, 1]."""

    def decode_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the VAE's latent normalization (``scaling_factor``, ``shift_factor``), decode, map to [0, 1].

        ``latents`` are in the VAE's ``[B, C, h, w]`` layout; families that pack latents unpack them first.
        """
        vae = self.pipeline.vae
        return self.vae_images(latents / vae.config.scaling_factor + vae.config.shift_factor)

    def vae_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode latents that are already in the VAE decoder's own space and map its ``[-1, 1]`` output to
        float32 ``[0, 1]``, as ``pipeline(..., output_type="pt")`` does. For families whose latent normalization
        is not ``scaling_factor`` / ``shift_factor`` (FLUX.2's batch-norm statistics): they undo their own and
        call this."""
        vae = self.pipeline.vae
        images = vae.decode(latents.to(self.vae_dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def save_transformer(self, directory: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Write a fully fine-tuned transformer in diffusers' layout
        (``<TransformerClass>.from_pretrained(directory)``): its config and the given weights, sharded like
        ``save_pretrained`` (``diffusion_pytorch_model*.safetensors`` plus an index). The weights are passed in,
        not read from the module, because under FSDP / ZeRO-3 the module holds one process's shard and only the
        gathered state dict is whole."""
        from huggingface_hub import save_torch_state_dict

        os.makedirs(directory, exist_ok=True)
        self.transformer.save_config(directory)
        save_torch_state_dict(
            state_dict, directory, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB"
        )

    def save_lora_weights(self, directory: str, lora_state_dict: dict[str, torch.Tensor]) -> None:
        """Write a transformer LoRA in the diffusers format (``pipe.load_lora_weights(directory)``).

        The LoRA's peft config goes into the file's metadata: without it diffusers loads the LoRA with
        ``lora_alpha = r``, i.e. at the wrong scale whenever they differ (the default config has 64 vs 32).
        """
        (lora_config,) = self.transformer.peft_config.values()  # the trainer adds exactly one LoRA
        type(self.pipeline).save_lora_weights(
            directory,
            transformer_lora_layers=lora_state_dict,
            transformer_lora_adapter_metadata=lora_config.to_dict(),
            safe_serialization=True,
        )
