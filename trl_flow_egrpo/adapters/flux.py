"""FLUX.1 (dev / schnell) through ``diffusers.FluxPipeline``.

FLUX specifics: latents are 2x2-packed into tokens ``[B, (h/2)(w/2), 4C]`` with a per-token position
grid (``img_ids``); the transformer is conditioned on ``timestep / 1000`` and, for FLUX.1-dev, on a
distilled guidance embedding (no classifier-free guidance pass); the scheduler of FLUX.1-dev shifts
its schedule dynamically with the image's token count.
"""

from __future__ import annotations

import torch

from .base import Conditioning, ModelAdapter


class FluxAdapter(ModelAdapter):
    """Adapter for ``FluxPipeline`` (FLUX.1-dev default guidance embedding 3.5)."""

    family = "flux"
    pipeline_class_names = ("FluxPipeline",)
    transformer_class_name = "FluxTransformer2DModel"
    default_lora_target_modules = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "proj_mlp",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )
    default_guidance_scale = 3.5
    default_max_shift = 1.15
    supports_negative_prompt = False  # guidance-distilled: guidance_scale is an embedding, one pass per step

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
        self.num_channels = pipeline.transformer.config.in_channels // 4

    @property
    def patch_size(self) -> int:
        """FLUX packs 2x2 latent patches into one token."""
        return 2

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        prompt_embeds, pooled_prompt_embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}

    def initial_noise(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        shape = (batch_size, self.num_channels, self.latent_height, self.latent_width)
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        return self.pipeline._pack_latents(
            noise, batch_size, self.num_channels, self.latent_height, self.latent_width
        ).to(self.device)

    def image_token_ids(self, device, dtype) -> torch.Tensor:
        """Position ids ``[N, 3]`` of the image tokens the transformer sees (the packed latent grid's)."""
        return self.pipeline._prepare_latent_image_ids(
            1, self.latent_height // 2, self.latent_width // 2, device, dtype
        )

    def image_tokens(self, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The image tokens the transformer sees: the noisy latents (FLUX.1 Kontext appends its source image's)."""
        return latents

    def velocity(self, model, latents, timesteps, conditioning):
        transformer = self.transformer
        dtype = self.transformer_dtype
        batch_size = latents.shape[0]
        device = latents.device
        image_ids = self.image_token_ids(device, dtype)
        text_ids = torch.zeros(conditioning["prompt_embeds"].shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((batch_size,), self.guidance_scale, device=device, dtype=torch.float32)
        hidden_states = self.image_tokens(latents, conditioning).to(dtype)
        # As FluxPipeline: the timestep is cast to the latents' dtype, then scaled to [0, 1].
        timestep = timesteps.to(device=device, dtype=hidden_states.dtype) / 1000
        velocity = model(
            hidden_states=hidden_states,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=conditioning["prompt_embeds"],
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return velocity[:, : latents.shape[1]].to(torch.float32)  # the noisy tokens' (Kontext: not the source's)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_vae(
            self.pipeline._unpack_latents(latents, self.height, self.width, self.pipeline.vae_scale_factor)
        )
