"""Stable Diffusion 3 / 3.5 (medium, large, large-turbo) through ``diffusers.StableDiffusion3Pipeline``.

SD3 specifics: latents are not packed (``[B, 16, H/8, W/8]``; the transformer patchifies them itself);
the transformer is conditioned on the raw timestep in [0, 1000] and on three text encoders (two CLIPs,
whose pooled projections are concatenated, and T5, whose tokens follow the CLIP tokens); guidance is
true classifier-free guidance, an unconditional (negative-prompt) pass next to the conditional one; the
released schedulers use a static shift of 3.

With guidance on, the policy *is* the guided sampler: its mean velocity is
``v_uncond + g * (v_cond - v_uncond)``. :meth:`SD3Adapter.velocity` computes exactly that, so rollouts
sample with it and the policy update recomputes it with gradients through both passes, and the
on-policy ratios are 1 without anything CFG-specific in the trainer.
"""

from __future__ import annotations

import torch

from .base import Conditioning, ModelAdapter


class SD3Adapter(ModelAdapter):
    """Adapter for ``StableDiffusion3Pipeline``.

    The default guidance scale is 4.5, the value the SD3.5-medium model card recommends and that GRPO
    fine-tuning of SD3.5-medium uses. The pipeline's own default, 7.0, is SD3-medium's; SD3.5 is meant to
    run lower (SD3.5-large: 3.5, set ``guidance_scale`` for it). A ``guidance_scale <= 1`` turns
    classifier-free guidance off (one transformer pass per row, the negative prompt is then unused), as
    in the pipeline.

    With guidance on, each trajectory costs two transformer rows (unconditional and conditional) in the
    same call, so a ``rollout_batch_size`` of ``n`` runs the transformer on ``2 n`` rows.

    Default LoRA targets (peft matches them as name suffixes):

    - ``attn.*``: the joint attention of every MMDiT block, image and text streams (query, key, value
      and output projections). These are the usual SD3 LoRA targets (diffusers' DreamBooth script).
    - ``attn2.*``: the extra image self-attention of SD3.5-medium's MMDiT-X blocks (its first 13 blocks);
      left out, those blocks would only be adapted through their joint attention. SD3 and SD3.5-large
      have no ``attn2`` and the names simply match nothing.
    - ``ff.*`` / ``ff_context.*``: the feed-forward layers of both streams, which hold most of each
      block's weights, as the FLUX adapter does.
    - ``proj_out``: the final projection from tokens to velocity patches, one small layer through which
      the LoRA acts on the output directly (FLUX's default adapts its ``proj_out`` too).

    The timestep embedder, the AdaLN modulations and the patch/caption embedders are not adapted.

    Schedule: the pipeline reproduces :meth:`schedule` when called with ``sigmas=numpy.linspace(1, 1/T, T)``;
    its default (no ``sigmas``) spaces the steps slightly differently near sigma = 0.
    """

    family = "sd3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    transformer_class_name = "SD3Transformer2DModel"
    default_lora_target_modules = (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "proj_out",
    )
    default_guidance_scale = 4.5
    default_max_shift = 1.16  # the SD3 pipeline's fallback (FLUX's is 1.15)
    card_imports = ("import numpy as np",)

    @classmethod
    def card_call_arguments(cls, config: dict) -> dict[str, str]:
        """As the base class, plus the schedule's unshifted sigmas ``np.linspace(1, 1/T, T)``: unlike FLUX's,
        SD3's pipeline does not pass them itself, and its default spacing differs (see the class docstring)."""
        arguments = super().card_call_arguments(config)
        steps = config.get("num_inference_steps")
        arguments["sigmas"] = f"np.linspace(1.0, 1.0 / {steps}, {steps})"
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
        self.num_channels = pipeline.transformer.config.in_channels

    @property
    def patch_size(self) -> int:
        """The transformer patchifies the unpacked latents itself."""
        return self.pipeline.transformer.config.patch_size

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether rollouts and training use classifier-free guidance (``guidance_scale > 1``, as the pipeline)."""
        return self.guidance_scale > 1

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The three encoders' prompt embeddings, plus the negative prompt's (one row per prompt, so that
        :func:`select_rows` indexes both alike) when guidance is on."""
        negative = [self.negative_prompt] * len(prompts)
        prompt_embeds, negative_embeds, pooled_embeds, negative_pooled_embeds = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            negative_prompt=negative,
            max_sequence_length=self.max_sequence_length,
        )
        conditioning = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_embeds}
        if self.do_classifier_free_guidance:
            conditioning.update(
                negative_prompt_embeds=negative_embeds, negative_pooled_prompt_embeds=negative_pooled_embeds
            )
        return conditioning

    def initial_noise(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """``[B, C, H/8, W/8]`` float32 noise, the draw ``StableDiffusion3Pipeline.prepare_latents`` makes
        for a float32 pipeline with this generator."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (batch_size, self.num_channels, self.latent_height, self.latent_width)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def velocity(self, model, latents, timesteps, conditioning):
        """The policy's velocity: the transformer's, or the classifier-free-guided combination of an
        unconditional and a conditional pass made in one batched call (rows ``[uncond, cond]``, as the
        pipeline orders them)."""
        dtype = self.transformer_dtype
        hidden_states = latents.to(dtype)
        # As the pipeline: the raw float32 timestep in [0, 1000]; the transformer embeds it in float32.
        timestep = timesteps.to(device=latents.device, dtype=torch.float32)
        prompt_embeds = conditioning["prompt_embeds"]
        pooled_embeds = conditioning["pooled_prompt_embeds"]
        if self.do_classifier_free_guidance:
            hidden_states = torch.cat([hidden_states, hidden_states])
            timestep = torch.cat([timestep, timestep])
            prompt_embeds = torch.cat([conditioning["negative_prompt_embeds"], prompt_embeds])
            pooled_embeds = torch.cat([conditioning["negative_pooled_prompt_embeds"], pooled_embeds])
        velocity = model(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled_embeds,
            return_dict=False,
        )[0].to(torch.float32)
        if self.do_classifier_free_guidance:
            uncond, cond = velocity.chunk(2)
            velocity = uncond + self.guidance_scale * (cond - uncond)
        return velocity

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """SD3 latents are unpacked: straight to the VAE (with SD3's ``scaling_factor`` and ``shift_factor``)."""
        return self.decode_vae(latents)
