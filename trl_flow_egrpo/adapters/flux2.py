"""FLUX.2 ([dev] and [klein]) through ``diffusers.Flux2Pipeline`` and ``diffusers.Flux2KleinPipeline``.

FLUX.2 specifics, shared by both pipelines:

- **Latents.** The VAE has 32 latent channels; the pipelines draw the initial noise already 2x2-patchified,
  ``[B, 128, H/16, W/16]`` (what ``latents=`` takes), and flatten that grid into tokens
  ``[B, (H/16)(W/16), 128]`` for the transformer. The adapter keeps the patchified grid as its latent layout
  (so its noise passes to the pipelines as it is) and flattens it for each transformer call. Positions are
  4-axis ids ``(time, row, column, text index)``: ``(0, i, j, 0)`` for image tokens, ``(0, 0, 0, l)`` for text.
- **Decoding.** The token latents are normalized with the VAE's batch-norm running statistics: decoding
  multiplies by ``sqrt(running_var + eps)``, adds ``running_mean``, un-patchifies to ``[B, 32, H/8, W/8]`` and
  runs the VAE decoder (there is no ``scaling_factor`` / ``shift_factor``).
- **Timesteps.** The transformer is conditioned on ``timestep / 1000`` (it multiplies by 1000 inside).
- **Schedule.** ``mu = compute_empirical_mu(image_tokens, num_steps)``: FLUX.2's shift depends on the number
  of steps as well as on the resolution (fewer steps, stronger shift).
- **Text.** One language model's hidden states at three layers, stacked per token (FLUX.2 [dev]: Mistral
  Small 3.1 with a system message, layers 10, 20, 30; [klein]: Qwen3 through its chat template, layers 9, 18,
  27), always padded to ``max_sequence_length``, so a prompt's embedding never depends on its batch.

Guidance differs:

- ``Flux2Pipeline`` (FLUX.2 [dev]) is guidance-distilled: the scale goes into a guidance embedding of the
  transformer, one pass per step, no negative prompt.
- ``Flux2KleinPipeline`` has no guidance embedding. The [klein] base models use true classifier-free
  guidance, ``v_neg + g (v_cond - v_neg)`` with the empty prompt as the negative one, when ``guidance_scale > 1``;
  the step-distilled [klein] models (``pipeline.config.is_distilled``) use none.
"""

from __future__ import annotations

import torch

from ..schedule import Schedule, scheduler_schedule
from .base import Conditioning, ModelAdapter


class Flux2Adapter(ModelAdapter):
    """Adapter for ``Flux2Pipeline`` and ``Flux2KleinPipeline``.

    The default guidance scale is 4.0, both pipelines' default (FLUX.2 [dev]: the guidance embedding; [klein]
    base: the classifier-free guidance scale; step-distilled [klein]: unused).

    A negative prompt is supported only where the pipeline has a negative pass: [klein] base models with
    ``guidance_scale > 1``. The pipeline itself always uses the empty prompt; a non-empty one reaches the
    pipeline as ``negative_prompt_embeds`` (``pipe.encode_prompt(negative_prompt)[0]``). Anywhere else a
    non-empty ``negative_prompt`` is refused rather than silently ignored.

    With classifier-free guidance on, each trajectory costs two transformer rows (conditional and negative) in
    the same call.

    Default LoRA targets (peft matches them as name suffixes):

    - ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` and ``add_q_proj``, ``add_k_proj``, ``add_v_proj``,
      ``to_add_out``: the joint attention of the double-stream blocks, image and text streams;
    - ``ff.linear_in``, ``ff.linear_out``, ``ff_context.linear_in``, ``ff_context.linear_out``: their SwiGLU
      feed-forwards;
    - ``to_qkv_mlp_proj`` and ``single_transformer_blocks.<i>.attn.to_out``: the fused input and output
      projections of every single-stream block, where most of FLUX.2's weights are (48 of its 56 blocks). The
      output projection is named per block because the suffix ``attn.to_out`` would also match the
      double-stream blocks' ``to_out`` container, which peft cannot adapt (diffusers' FLUX.2 DreamBooth script
      lists them the same way);
    - ``proj_out``: the final projection to velocity tokens, as for FLUX.1 and SD3.

    The timestep/guidance embedder, the shared modulations and the input embedders are not adapted.
    """

    family = "flux2"
    pipeline_class_names = ("Flux2Pipeline", "Flux2KleinPipeline")
    transformer_class_name = "Flux2Transformer2DModel"
    default_guidance_scale = 4.0
    shared_lora_target_modules = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "ff.linear_in",
        "ff.linear_out",
        "ff_context.linear_in",
        "ff_context.linear_out",
        "to_qkv_mlp_proj",
        "proj_out",
    )
    """The LoRA targets whose names do not depend on the number of blocks."""

    @classmethod
    def card_call_arguments(cls, config: dict) -> dict[str, str]:
        """As the base class, but a negative prompt goes in as ``negative_prompt_embeds`` (its encoding by the
        pipeline, at the run's ``max_sequence_length``): the FLUX.2 pipelines take no ``negative_prompt``, and
        ``Flux2KleinPipeline`` encodes the empty prompt unless given another one's embedding."""
        arguments = super().card_call_arguments(config)
        negative = arguments.pop("negative_prompt", None)
        if negative is not None:
            arguments["negative_prompt_embeds"] = (
                f"pipe.encode_prompt({negative}, device=device, "
                f"max_sequence_length={arguments['max_sequence_length']})[0]"
            )
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
        self.is_klein = any(klass.__name__ == "Flux2KleinPipeline" for klass in type(pipeline).__mro__)
        if negative_prompt and not self.do_classifier_free_guidance:
            raise ValueError(
                f"negative_prompt={negative_prompt!r}: {self._why_no_negative_prompt()} Set "
                "negative_prompt to '' (EGRPOConfig.negative_prompt)."
            )
        token_grid = (1, 1, self.latent_height // 2, self.latent_width // 2)  # only the shape is read
        self.image_ids = pipeline._prepare_latent_ids(torch.zeros(token_grid))[0]
        """``[N, 4]`` position ids of the image tokens, ``(0, row, column, 0)``."""

    @property
    def patch_size(self) -> int:
        """FLUX.2 patchifies 2x2 latent pixels into one token."""
        return 2

    @property
    def default_lora_target_modules(self) -> tuple[str, ...]:
        """:attr:`shared_lora_target_modules` plus every single-stream block's ``attn.to_out`` by index."""
        single_blocks = self.transformer.config.num_single_layers
        return self.shared_lora_target_modules + tuple(
            f"single_transformer_blocks.{index}.attn.to_out" for index in range(single_blocks)
        )

    @property
    def is_step_distilled(self) -> bool:
        """A step-distilled [klein] model (``Flux2KleinPipeline`` with ``is_distilled=True``): no guidance."""
        return self.is_klein and bool(self.pipeline.config.get("is_distilled", False))

    @property
    def do_classifier_free_guidance(self) -> bool:
        """True classifier-free guidance: [klein] base models with ``guidance_scale > 1`` (as the pipeline)."""
        return self.is_klein and not self.is_step_distilled and self.guidance_scale > 1

    @property
    def uses_guidance_embedding(self) -> bool:
        """Whether the scale goes to the transformer's guidance embedding: ``Flux2Pipeline`` (FLUX.2 [dev]) always
        passes it, ``Flux2KleinPipeline`` never does."""
        return not self.is_klein

    def _why_no_negative_prompt(self) -> str:
        """Why this pipeline and guidance have no negative pass, for the error message."""
        if not self.is_klein:
            return (
                "Flux2Pipeline (FLUX.2 [dev]) has no negative prompt: it is guidance-distilled and takes "
                "guidance_scale as an embedding, with one pass per step."
            )
        if self.is_step_distilled:
            return (
                "this Flux2KleinPipeline is step-distilled (is_distilled=True): it samples without "
                "classifier-free guidance, so a negative prompt would never be used."
            )
        return (
            f"classifier-free guidance is off (guidance_scale={self.guidance_scale} <= 1), so a negative prompt "
            "would never be used; set guidance_scale > 1 to use one."
        )

    def schedule(self, num_steps: int, shift: float | None) -> Schedule:
        """As the base class, but with FLUX.2's ``mu = compute_empirical_mu(image tokens, num_steps)`` (the
        pipelines' own function, so the schedule is bit-identical to theirs) for dynamically shifting
        schedulers."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        mu = compute_empirical_mu(image_seq_len=self.num_image_tokens, num_steps=num_steps)
        return scheduler_schedule(self.pipeline.scheduler, num_steps, shift=shift, mu=mu)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The prompts' stacked hidden states ``[P, max_sequence_length, 3 * hidden]``, and, with classifier-free
        guidance, the negative prompt's (one row per prompt, so that :func:`select_rows` indexes both alike)."""

        def encode(texts: list[str]) -> torch.Tensor:
            return self.pipeline.encode_prompt(
                prompt=texts, device=self.device, num_images_per_prompt=1, max_sequence_length=self.max_sequence_length
            )[0]

        conditioning = {"prompt_embeds": encode(prompts)}
        if self.do_classifier_free_guidance:
            conditioning["negative_prompt_embeds"] = encode([self.negative_prompt] * len(prompts))
        return conditioning

    def initial_noise(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Patchified latents ``[B, 128, H/16, W/16]``: the draw the pipelines' ``prepare_latents`` makes for a
        float32 pipeline with this generator, in the layout their ``latents=`` argument takes."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (batch_size, self.transformer.config.in_channels, self.latent_height // 2, self.latent_width // 2)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def velocity(self, model, latents, timesteps, conditioning):
        """The policy's velocity: one pass with the guidance embedding ([dev]) or none (distilled [klein]), or
        the classifier-free-guided combination of a conditional and a negative pass made in one batched call
        ([klein] base). The grid is flattened into tokens for the transformer and its output folded back."""
        dtype = self.transformer_dtype
        batch_size = latents.shape[0]
        hidden_states = self.pipeline._pack_latents(latents.to(dtype))
        # As the pipelines: the timestep in the latents' dtype, divided by 1000.
        timestep = timesteps.to(device=latents.device, dtype=hidden_states.dtype) / 1000
        prompt_embeds = conditioning["prompt_embeds"]
        guidance = None
        if self.uses_guidance_embedding:
            guidance = torch.full((batch_size,), self.guidance_scale, device=latents.device, dtype=torch.float32)
        if self.do_classifier_free_guidance:
            hidden_states = torch.cat([hidden_states, hidden_states])
            timestep = torch.cat([timestep, timestep])
            prompt_embeds = torch.cat([prompt_embeds, conditioning["negative_prompt_embeds"]])
        text_ids = self.pipeline._prepare_text_ids(prompt_embeds[:1])[0].to(latents.device)
        velocity = model(
            hidden_states=hidden_states,
            timestep=timestep,
            guidance=guidance,
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=self.image_ids.to(latents.device),
            return_dict=False,
        )[0].to(torch.float32)
        if self.do_classifier_free_guidance:
            cond, negative = velocity.chunk(2)
            velocity = negative + self.guidance_scale * (cond - negative)
        return self.grid(velocity)

    def grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, N, 128]`` back onto the patchified grid ``[B, 128, H/16, W/16]`` (the inverse of the
        pipelines' ``_pack_latents``; their ``_unpack_latents_with_ids`` does the same by position id)."""
        return tokens.transpose(1, 2).reshape(len(tokens), -1, self.latent_height // 2, self.latent_width // 2)

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Patchified latents to the VAE's ``[B, 32, H/8, W/8]``: batch-norm statistics undone, 2x2 patches
        unfolded. This is what ``Flux2KleinPipeline(..., output_type="latent")`` returns."""
        vae = self.pipeline.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
            latents.device, latents.dtype
        )
        return self.pipeline._unpatchify_latents(latents * std + mean)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """FLUX.2's decoding (:meth:`vae_latents`, then the VAE decoder), without a scaling or shift factor."""
        return self.vae_images(self.vae_latents(latents))
