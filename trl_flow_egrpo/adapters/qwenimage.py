"""Qwen-Image through ``diffusers.QwenImagePipeline``.

Qwen-Image specifics:

- **Latents.** A Wan-style 3D causal VAE (8x spatial, 16 channels) whose latents have a frame axis of one,
  ``[B, 16, 1, H/8, W/8]``; the pipeline packs 2x2 patches into tokens ``[B, (H/16)(W/16), 64]`` (FLUX.1's
  packing) and its ``latents=`` argument takes those tokens, which are the adapter's layout.
- **Decoding.** Latents are normalized per channel: decoding divides by ``1 / latents_std`` and adds
  ``latents_mean`` (the VAE config's lists), decodes, and keeps the single frame.
- **Timesteps.** The transformer is conditioned on ``timestep / 1000``, with ``img_shapes`` (frames, rows,
  columns of the token grid) for its 3-axis RoPE.
- **Schedule.** Dynamic shift, ``mu`` linear in the token count with the scheduler config's values, as the base
  class computes it; the released scheduler (``max_shift`` 0.9 up to 8192 tokens) also stretches the schedule so
  that its last nonzero sigma is ``shift_terminal`` = 0.02, which the scheduler code applies itself.
- **Text.** Qwen2.5-VL's last hidden state over a fixed prompt template, whose first 34 tokens (the system
  message) are dropped; padding is masked (``encoder_hidden_states_mask``).
- **Guidance.** True classifier-free guidance with a negative prompt (``true_cfg_scale`` in the pipeline, our
  ``guidance_scale``, default 4.0), then a **norm rescale**: per token, the guided velocity is scaled to the norm
  of the conditional one::

      guided = v_neg + g (v_cond - v_neg)
      v = guided * ||v_cond|| / ||guided||        (norms over each token's channels)

  That rescaled velocity is the policy's mean, so rollouts sample with it and training differentiates it.
"""

from __future__ import annotations

import torch

from .base import Conditioning, ModelAdapter, conditioning_with_negative, unnormalize_wan_vae_latents


class QwenImageAdapter(ModelAdapter):
    """Adapter for ``QwenImagePipeline``.

    ``guidance_scale`` is the pipeline's ``true_cfg_scale`` (4.0 by default, the pipeline's default and the
    model card's setting); ``guidance_scale <= 1`` samples without a negative pass. The negative prompt, like
    the model card's ``" "``, is any string; the pipeline reproduces the adapter's sampling with
    ``negative_prompt=<the same string>, true_cfg_scale=<guidance_scale>``. A non-empty negative prompt without
    guidance is refused (it would never be used).

    Prompt embeddings: the pipeline pads a batch's embeddings to its longest prompt, so a prompt's tensor would
    depend on its batch. The adapter pads every prompt to ``max_sequence_length`` with its padding masked (the
    conditioning keeps one shape across batches, iterations and the prompt cache) and each transformer call cuts
    the batch to its longest prompt. Masked padding does not change the image tokens' attention, so this matches
    the pipeline up to float error; when no row of a call has padding left, the mask is dropped, as the pipeline
    drops an all-ones mask.

    Default LoRA targets (peft matches them as name suffixes): the joint attention of every block, image and text
    streams (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``add_q_proj``, ``add_k_proj``, ``add_v_proj``,
    ``to_add_out``), both streams' feed-forwards (``img_mlp.net.0.proj``, ``img_mlp.net.2``,
    ``txt_mlp.net.0.proj``, ``txt_mlp.net.2``) and the final ``proj_out``, as for the other families. The
    modulations, the timestep embedder and the input projections are not adapted.
    """

    family = "qwenimage"
    pipeline_class_names = ("QwenImagePipeline",)
    transformer_class_name = "QwenImageTransformer2DModel"
    default_lora_target_modules = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
        "proj_out",
    )
    default_guidance_scale = 4.0
    guidance_argument = "true_cfg_scale"

    @classmethod
    def pipeline_call_arguments(cls, config: dict) -> dict:
        """As the base class, with ``negative_prompt`` passed whenever guidance is on: ``QwenImagePipeline`` runs
        its negative pass only when given one, even ``""``."""
        arguments = super().pipeline_call_arguments(config)
        guidance = config.get("guidance_scale")
        if (cls.default_guidance_scale if guidance is None else guidance) > 1:
            arguments["negative_prompt"] = config.get("negative_prompt") or ""
        return arguments

    def __init__(
        self,
        pipeline,
        height: int,
        width: int,
        guidance_scale: float | None = None,
        max_sequence_length: int = 512,
        negative_prompt: str = "",
    ):
        super().__init__(pipeline, height, width, guidance_scale, max_sequence_length, negative_prompt)
        if pipeline.transformer.config.guidance_embeds:
            raise ValueError(
                "This QwenImageTransformer2DModel has guidance_embeds=True (a guidance-distilled "
                "variant). E-GRPO supports Qwen-Image with true classifier-free guidance only; load a "
                "checkpoint with guidance_embeds=False (Qwen/Qwen-Image)."
            )
        if negative_prompt and not self.do_classifier_free_guidance:
            raise ValueError(
                f"negative_prompt={negative_prompt!r}: classifier-free guidance is off "
                f"(guidance_scale={self.guidance_scale} <= 1), so a negative prompt would never be used. "
                "Set guidance_scale > 1 to use it, or negative_prompt to ''."
            )
        self.num_channels = pipeline.transformer.config.in_channels // 4

    @property
    def patch_size(self) -> int:
        """Qwen-Image packs 2x2 latent pixels into one token."""
        return 2

    @property
    def do_classifier_free_guidance(self) -> bool:
        """True classifier-free guidance with the negative prompt (``guidance_scale > 1``)."""
        return self.guidance_scale > 1

    @property
    def img_shapes(self) -> list[list[tuple[int, int, int]]]:
        """The token grid ``(frames, rows, columns)`` of one image, in the transformer's per-sample list form."""
        return [[(1, self.latent_height // 2, self.latent_width // 2)]]

    @property
    def encoded_length(self) -> int:
        """The length every prompt's embeddings are padded to: ``max_sequence_length`` (Qwen-Image-Edit adds its
        source image's vision tokens)."""
        return self.max_sequence_length

    def _encode(self, prompts: list[str], **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's encoding (``inputs``: further ``encode_prompt`` arguments), padded with masked zeros to
        :attr:`encoded_length`: ``([P, L, D], [P, L])``."""
        embeds, mask = self.pipeline.encode_prompt(
            prompt=prompts,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
            **inputs,
        )
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        padding = self.encoded_length - embeds.shape[1]
        if padding < 0:
            raise ValueError(
                f"A prompt's encoding has {embeds.shape[1]} tokens, more than the {self.encoded_length} this run "
                f"pads to (max_sequence_length={self.max_sequence_length}, plus the source image's vision tokens for "
                "an editing pipeline). Raise EGRPOConfig.max_sequence_length or shorten the prompt."
            )
        return (
            torch.nn.functional.pad(embeds, (0, 0, 0, padding)),
            torch.nn.functional.pad(mask.to(torch.long), (0, padding)),
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Prompt embeddings and masks ``[P, max_sequence_length, (D)]``, and with guidance the negative
        prompt's (one row per prompt, so that :func:`select_rows` indexes both alike)."""
        return conditioning_with_negative(
            self._encode, prompts, self.negative_prompt if self.do_classifier_free_guidance else None
        )

    def initial_noise(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Packed tokens ``[B, (H/16)(W/16), 64]``: the ``[B, 1, 16, H/8, W/8]`` draw
        ``QwenImagePipeline.prepare_latents`` makes for a float32 pipeline with this generator, packed as it
        packs it."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (batch_size, 1, self.num_channels, self.latent_height, self.latent_width)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        return self.pipeline._pack_latents(noise, batch_size, self.num_channels, self.latent_height, self.latent_width)

    def velocity(self, model, latents, timesteps, conditioning):
        """The policy's velocity: the transformer's, or the norm-rescaled classifier-free-guided combination of
        a conditional and a negative pass made in one batched call (rows ``[cond, negative]``)."""
        dtype = self.transformer_dtype
        hidden_states = self.image_tokens(latents, conditioning).to(dtype)
        # As the pipeline: the timestep in the latents' dtype, divided by 1000.
        timestep = timesteps.to(device=latents.device, dtype=hidden_states.dtype) / 1000
        embeds, mask = conditioning["prompt_embeds"], conditioning["prompt_embeds_mask"]
        if self.do_classifier_free_guidance:
            hidden_states = torch.cat([hidden_states, hidden_states])
            timestep = torch.cat([timestep, timestep])
            embeds = torch.cat([embeds, conditioning["negative_prompt_embeds"]])
            mask = torch.cat([mask, conditioning["negative_prompt_embeds_mask"]])
        length = int(mask.sum(dim=1).max())  # the longest prompt of this call; the rest is padding
        embeds, mask = embeds[:, :length], mask[:, :length]
        velocity = model(
            hidden_states=hidden_states,
            timestep=timestep,
            guidance=None,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=None if mask.all() else mask,
            img_shapes=self.img_shapes * len(hidden_states),
            return_dict=False,
        )[0][:, : latents.shape[1]].to(torch.float32)  # the noisy tokens' (Qwen-Image-Edit: not the source's)
        if self.do_classifier_free_guidance:
            cond, negative = velocity.chunk(2)
            guided = negative + self.guidance_scale * (cond - negative)
            velocity = guided * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))
        return velocity

    def image_tokens(self, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The image tokens the transformer sees: the noisy latents (Qwen-Image-Edit appends its source's)."""
        return latents

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed tokens to the VAE's ``[B, 16, 1, H/8, W/8]``, its per-channel normalization undone (in the
        pipeline's order of operations)."""
        grid = self.pipeline._unpack_latents(latents, self.height, self.width, self.pipeline.vae_scale_factor)
        return unnormalize_wan_vae_latents(self.pipeline.vae, grid)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Qwen-Image's decoding (:meth:`vae_latents`, the 3D VAE), keeping the one frame."""
        return self.vae_images(self.vae_latents(latents))[:, :, 0]
