"""Z-Image (Z-Image and Z-Image-Turbo) through ``diffusers.ZImagePipeline``.

Z-Image specifics:

- **Latents.** FLUX.1's VAE layout (8x, 16 channels, ``scaling_factor`` / ``shift_factor``). The pipeline keeps
  latents as ``[B, 16, H/8, W/8]`` (what ``latents=`` takes, the adapter's layout) and hands the transformer a
  *list* of per-sample ``[16, 1, H/8, W/8]`` tensors (a frame axis of one); the transformer cuts 2x2 patches
  itself and returns a list in the same layout.
- **Time.** The transformer's time runs the other way: it is conditioned on ``(1000 - timestep) / 1000 =
  1 - sigma`` (0 at pure noise, 1 at data) and predicts ``x_0 - noise``, the negative of the flow velocity;
  the pipeline negates the prediction before the Euler step, and so does the adapter.
- **Schedule.** ``sigmas = torch.linspace(1, 1/T, T)`` in float32 (not FLUX's float64 ``np.linspace``: they
  differ by one float32 ulp for some T), then the scheduler's shift: the released schedulers shift statically
  (3.0); a dynamically shifting scheduler gets FLUX's ``mu`` from the token count, as the pipeline computes it.
- **Text.** Qwen3 through its chat template, read at the second-to-last hidden state; each prompt keeps only
  its real tokens (the pipeline passes one variable-length tensor per prompt, no padding).
- **Guidance.** Classifier-free guidance with a negative prompt (the empty prompt by default) when
  ``guidance_scale > 0``, in the pipeline's form ``v_cond + g (v_cond - v_neg)`` (that is, ``1 + g`` in the
  usual ``v_neg + w (v_cond - v_neg)`` form); ``guidance_scale = 0`` is one pass per step, as Z-Image-Turbo
  samples.
"""

from __future__ import annotations

import torch

from ..schedule import Schedule
from .base import Conditioning, ModelAdapter, conditioning_with_negative


class ZImageAdapter(ModelAdapter):
    """Adapter for ``ZImagePipeline``.

    ``guidance_scale`` is the pipeline's ``guidance_scale``, with its meaning: classifier-free guidance
    ``v_cond + g (v_cond - v_neg)`` for ``g > 0``, none for ``g = 0``. The default is the pipeline's, 5.0; the Z-Image
    model card samples with 4.0, and Z-Image-Turbo (guidance-free, 8 to 9 steps) needs ``guidance_scale=0``, which
    nothing in the checkpoint tells apart from the base model. Negative scales are refused (the pipeline would
    silently turn guidance off), and so is a non-empty negative prompt without guidance (it would never be used).

    The pipeline's ``cfg_normalization`` (clip the guided velocity's norm) and ``cfg_truncation`` (drop guidance
    late in the schedule) options are not supported: the adapter samples as the pipeline does with their defaults
    (``False`` and ``1.0``: both off).

    Prompt embeddings: the adapter pads every prompt's embedding to ``max_sequence_length`` with a mask (the
    conditioning keeps one shape across batches and the prompt cache) and each transformer call passes the
    masked rows, i.e. exactly the per-prompt tensors the pipeline passes.

    Default LoRA targets (peft matches them as name suffixes): the attention (``to_q``, ``to_k``, ``to_v``,
    ``to_out.0``) and SwiGLU feed-forward (``feed_forward.w1``, ``w2``, ``w3``) of every block (the noise and
    context refiners and the joint single-stream blocks), and the final projection to velocity patches
    (``all_final_layer.2-1.linear``), as for the other families. The modulations, the timestep and caption
    embedders and the patch embedder are not adapted.
    """

    family = "zimage"
    pipeline_class_names = ("ZImagePipeline",)
    transformer_class_name = "ZImageTransformer2DModel"
    default_lora_target_modules = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
        "all_final_layer.2-1.linear",
    )
    default_guidance_scale = 5.0

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
        if self.guidance_scale < 0:
            raise ValueError(
                f"guidance_scale={self.guidance_scale}: ZImagePipeline's classifier-free guidance scale "
                "must be >= 0 (0 turns guidance off, as Z-Image-Turbo samples; the Z-Image model card "
                "uses 4.0). Set EGRPOConfig.guidance_scale accordingly."
            )
        if negative_prompt and not self.do_classifier_free_guidance:
            raise ValueError(
                f"negative_prompt={negative_prompt!r}: classifier-free guidance is off "
                "(guidance_scale=0), so a negative prompt would never be used. Set guidance_scale > 0 "
                "to use it (the base Z-Image model), or negative_prompt to '' (Z-Image-Turbo)."
            )
        if self.patch_size not in pipeline.transformer.config.all_patch_size:
            raise ValueError(
                "This ZImageTransformer2DModel has patch sizes "
                f"{pipeline.transformer.config.all_patch_size}; ZImagePipeline samples with "
                f"{self.patch_size}x{self.patch_size} patches. Load a "
                "text-to-image Z-Image checkpoint (Tongyi-MAI/Z-Image or Tongyi-MAI/Z-Image-Turbo)."
            )

    @property
    def patch_size(self) -> int:
        """Z-Image patchifies 2x2 latent pixels into one token (the pipeline's ``patch_size``)."""
        return 2

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Classifier-free guidance with the negative prompt (``guidance_scale > 0``, as the pipeline)."""
        return self.guidance_scale > 0

    def schedule(self, num_steps: int, shift: float | None) -> Schedule:
        """The base class's schedule (static ``shift`` or the scheduler's own, ``mu`` for a dynamic one), built from
        the pipeline's own float32 grid ``get_default_z_image_sigmas(T) = torch.linspace(1, 1/T, T)`` so that its
        sigmas are bit-identical to the pipeline's."""
        import copy

        from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

        super().schedule(num_steps, shift)  # raises if the scheduler makes an unusable schedule
        scheduler = self.pipeline.scheduler
        if shift is not None:
            scheduler = type(scheduler).from_config(scheduler.config, shift=float(shift), use_dynamic_shifting=False)
        else:
            scheduler = copy.deepcopy(scheduler)
        mu = self.dynamic_shift_mu() if scheduler.config.get("use_dynamic_shifting", False) else None
        scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(num_steps), device="cpu", mu=mu)
        return Schedule(
            sigmas=scheduler.sigmas.detach().to(torch.float32).cpu(),
            timesteps=scheduler.timesteps.detach().to(torch.float32).cpu(),
        )

    def dynamic_shift_mu(self) -> float:
        """``mu`` of a dynamically shifting scheduler at this resolution, as ``ZImagePipeline`` computes it."""
        from ..schedule import dynamic_shift_mu

        config = self.pipeline.scheduler.config
        return dynamic_shift_mu(
            self.num_image_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", self.default_max_shift),
        )

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's per-prompt embeddings, zero-padded to ``max_sequence_length``: ``([P, L, D], [P, L])``
        with the mask marking each prompt's real tokens."""
        # A copy: the pipeline writes the chat-templated prompts back into the list it is given.
        embeds = self.pipeline.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )[0]
        lengths = torch.tensor([len(embed) for embed in embeds], device=embeds[0].device)
        padded = torch.stack(
            [torch.nn.functional.pad(embed, (0, 0, 0, self.max_sequence_length - len(embed))) for embed in embeds]
        )
        mask = torch.arange(self.max_sequence_length, device=lengths.device)[None] < lengths[:, None]
        return padded, mask.to(torch.long)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Prompt embeddings and masks ``[P, max_sequence_length, (D)]``, and with guidance the negative
        prompt's (one row per prompt, so that :func:`select_rows` indexes both alike)."""
        return conditioning_with_negative(
            self._encode, prompts, self.negative_prompt if self.do_classifier_free_guidance else None
        )

    def initial_noise(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Latents ``[B, 16, H/8, W/8]``: the draw ``ZImagePipeline.prepare_latents`` makes with this generator."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (batch_size, self.transformer.config.in_channels, self.latent_height, self.latent_width)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def velocity(self, model, latents, timesteps, conditioning):
        """The policy's velocity: minus the transformer's prediction, or minus the classifier-free-guided
        combination ``p_cond + g (p_cond - p_neg)`` of a conditional and a negative pass made in one call (rows
        ``[cond, negative]``). The transformer takes and returns per-sample lists with a frame axis of one."""
        hidden_states = latents.to(self.transformer_dtype)
        # As the pipeline: float32 time 1 - sigma, computed from the scheduler's timestep.
        time = (1000 - timesteps.to(device=latents.device, dtype=torch.float32)) / 1000
        captions = self._captions(conditioning["prompt_embeds"], conditioning["prompt_embeds_mask"])
        if self.do_classifier_free_guidance:
            hidden_states = torch.cat([hidden_states, hidden_states])
            time = torch.cat([time, time])
            captions += self._captions(
                conditioning["negative_prompt_embeds"], conditioning["negative_prompt_embeds_mask"]
            )
        outputs = model(list(hidden_states.unsqueeze(2).unbind(0)), time, captions, return_dict=False)[0]
        prediction = torch.stack([output.float() for output in outputs]).squeeze(2)
        if self.do_classifier_free_guidance:
            cond, negative = prediction.chunk(2)
            prediction = cond + self.guidance_scale * (cond - negative)
        return -prediction

    @staticmethod
    def _captions(embeds: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Each row's real tokens ``[L_i, D]``, the per-prompt list the transformer takes."""
        return [row[row_mask.bool()] for row, row_mask in zip(embeds, mask, strict=True)]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE decode with ``scaling_factor`` / ``shift_factor`` undone, as the pipeline decodes."""
        return self.decode_vae(latents)
