"""Wan 2.1 text-to-video (and single-transformer Wan 2.2) through ``diffusers.WanPipeline``.

Wan specifics:

- **Latents.** A 3D causal VAE, 8x spatial and 4x temporal downsampling, 16 latent channels: ``num_frames``
  video frames (``4k + 1``) become ``k + 1`` latent frames and the latents are ``[B, 16, k + 1, H/8, W/8]``, the
  layout the transformer, the pipeline's ``latents=`` argument and this adapter all use. The transformer
  patchifies ``1 x 2 x 2`` (frame, row, column) into one token itself.
- **Decoding.** Latents are normalized per channel: decoding divides by ``1 / latents_std``, adds
  ``latents_mean`` (the VAE config's lists), decodes to ``[B, 3, F, H, W]`` and, as
  ``pipeline(..., output_type="pt")``, maps to [0, 1] with the frame axis first: ``[B, F, 3, H, W]``.
  Rewards receive these videos.
- **Timesteps.** The transformer is conditioned on the scheduler's timestep (``sigma * 1000``) as it is; Wan 2.2
  TI2V (``expand_timesteps=True``) takes it once per video token, as its pipeline hands it.
- **Schedule.** The released checkpoints ship a ``UniPCMultistepScheduler`` (a multistep solver) with a static
  ``flow_shift``. E-GRPO samples with Euler / SDE steps, so the adapter's schedule is the one
  ``WanPipeline`` samples with when its scheduler is :meth:`WanAdapter.euler_scheduler`: a
  ``FlowMatchEulerDiscreteScheduler`` with ``shift = flow_shift`` (or ``EGRPOConfig.shift``), whose
  ``set_timesteps(T)`` gives the sigmas.
- **Text.** UMT5-XXL's last hidden state, each prompt cut to its tokens and zero-padded to
  ``max_sequence_length``; the transformer gets no mask (it attends to the zero padding, as in the pipeline), so
  a prompt's embedding never depends on its batch.
- **Guidance.** True classifier-free guidance, ``v_neg + g (v_cond - v_neg)`` with ``g = guidance_scale`` (the
  pipeline's default and the model card's 5.0); the pipeline's negative prompt is ``""`` unless one is given
  (the model card passes a long list of defects, which ``EGRPOConfig.negative_prompt`` can carry).
- **Wan 2.2 A14B** (``transformer_2`` with ``boundary_ratio``: one expert for high noise, one for low noise) is
  refused: E-GRPO would train one policy across two networks, which this adapter does not do.
"""

from __future__ import annotations

import torch

from ..schedule import Schedule
from .base import Conditioning, ModelAdapter, unnormalize_wan_vae_latents


def check_num_frames(num_frames: int, temporal_factor: int) -> int:
    """``num_frames`` if the VAE can encode it, i.e. ``num_frames = temporal_factor * k + 1`` with ``k >= 0``
    (the causal VAE keeps the first frame and compresses every following ``temporal_factor`` frames into one
    latent frame); else a ValueError naming the nearest valid counts."""
    if num_frames < 1 or (num_frames - 1) % temporal_factor:
        below = max(1, (num_frames - 1) // temporal_factor * temporal_factor + 1)
        options = f"{below} or {below + temporal_factor}" if below < num_frames else str(below)
        raise ValueError(
            f"num_frames={num_frames!r}: Wan needs {temporal_factor}k + 1 frames (1, "
            f"{temporal_factor + 1}, {2 * temporal_factor + 1}, ..., 81), the VAE's temporal "
            f"compression being {temporal_factor}x. Set EGRPOConfig.num_frames to e.g. {options}."
        )
    return num_frames


class WanAdapter(ModelAdapter):
    """Adapter for ``WanPipeline`` (text-to-video).

    Args:
        pipeline, height, width, max_sequence_length: as :class:`ModelAdapter`.
        guidance_scale: the classifier-free guidance scale (default 5.0); ``<= 1`` samples without a negative
            pass, as the pipeline.
        negative_prompt: the negative prompt (default ``""``, what the pipeline uses when given none); refused
            without guidance, where it would never be used.
        num_frames: frames per video, ``4k + 1`` (default 81, the pipeline's and the model card's).

    Each trajectory costs two transformer rows per step with guidance on (conditional and negative, in the same
    call). The pipeline reproduces the adapter's sampling with ``pipe.scheduler = adapter.euler_scheduler(shift)``
    and ``pipe(prompt, negative_prompt=<the same string>, guidance_scale=<the same>, num_frames=<the same>,
    height=..., width=..., max_sequence_length=..., latents=<adapter.initial_noise(...)>)``.

    Default LoRA targets (peft matches them as name suffixes): the self-attention (``attn1``) and the
    cross-attention to the text (``attn2``) of every block, both ``to_q``, ``to_k``, ``to_v``, ``to_out.0``, the
    feed-forward (``ffn.net.0.proj``, ``ffn.net.2``) and the final ``proj_out``, as for the image families. The
    patch embedding, the condition embedder and the modulations are not adapted.
    """

    family = "wan"
    pipeline_class_names = ("WanPipeline",)
    transformer_class_name = "WanTransformer3DModel"
    default_lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out")
    default_guidance_scale = 5.0
    default_num_frames = 81
    """Frames per video when ``num_frames`` is None: the pipeline's default (5 s at 16 fps)."""
    is_video = True

    def __init__(
        self,
        pipeline,
        height: int,
        width: int,
        guidance_scale: float | None = None,
        max_sequence_length: int = 512,
        negative_prompt: str = "",
        num_frames: int | None = None,
    ):
        if getattr(pipeline, "transformer_2", None) is not None or pipeline.config.get("boundary_ratio") is not None:
            raise ValueError(
                "This WanPipeline has two transformers (transformer_2 with boundary_ratio="
                f"{pipeline.config.get('boundary_ratio')}, Wan 2.2 A14B's high- and low-noise experts). "
                "E-GRPO supports single-transformer Wan pipelines (Wan 2.1 T2V 1.3B / 14B, Wan 2.2 "
                "TI2V 5B); load one of them, or drop transformer_2 and boundary_ratio to train the "
                "high-noise expert alone."
            )
        super().__init__(pipeline, height, width, guidance_scale, max_sequence_length, negative_prompt)
        if negative_prompt and not self.do_classifier_free_guidance:
            raise ValueError(
                f"negative_prompt={negative_prompt!r}: classifier-free guidance is off "
                f"(guidance_scale={self.guidance_scale} <= 1), so a negative prompt would never be used. "
                "Set guidance_scale > 1 to use it, or negative_prompt to ''."
            )
        temporal_factor = pipeline.vae_scale_factor_temporal
        self.num_frames = check_num_frames(
            self.default_num_frames if num_frames is None else num_frames, temporal_factor
        )
        self.latent_frames = (self.num_frames - 1) // temporal_factor + 1
        """Latent frames ``k + 1`` of ``4k + 1`` video frames."""

    @property
    def vae_scale_factor(self) -> int:
        """The VAE's spatial downsampling (``WanPipeline.vae_scale_factor_spatial``, 8; 16 for Wan 2.2's VAE)."""
        return self.pipeline.vae_scale_factor_spatial

    @property
    def patch_size(self) -> int:
        """The transformer's spatial patch side (its ``patch_size`` is ``(frames, rows, columns) = (1, 2, 2)``)."""
        return self.transformer.config.patch_size[1]

    @property
    def num_video_tokens(self) -> int:
        """Tokens the transformer sees per video: latent frames times patches per latent frame."""
        frames, rows, columns = self.transformer.config.patch_size
        return (self.latent_frames // frames) * (self.latent_height // rows) * (self.latent_width // columns)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """True classifier-free guidance with the negative prompt (``guidance_scale > 1``, as the pipeline)."""
        return self.guidance_scale > 1

    @classmethod
    def sampling_scheduler_code(cls, shift: float | None) -> str | None:
        """Always an Euler scheduler: the released checkpoints ship a UniPC multistep solver, the trainer samples
        Euler steps with its ``flow_shift`` (or the run's static ``shift``): the scheduler :meth:`euler_scheduler`
        builds from a UniPC one."""
        return (
            "FlowMatchEulerDiscreteScheduler(num_train_timesteps=pipe.scheduler.config.num_train_timesteps, "
            f"shift={'pipe.scheduler.config.flow_shift' if shift is None else float(shift)})"
        )

    def euler_scheduler(self, shift: float | None = None):
        """The ``FlowMatchEulerDiscreteScheduler`` whose ``set_timesteps(T)`` gives this adapter's schedule.

        A pipeline that already holds one keeps its config (``shift`` replaces its shift); for the released
        ``UniPCMultistepScheduler`` it is a default Euler scheduler with ``shift = flow_shift`` of that config.
        Assign it to ``pipe.scheduler`` to make ``WanPipeline`` sample exactly as the adapter does.

        Raises:
            ValueError: ``shift`` is None and the pipeline's scheduler has no static shift to take.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = self.pipeline.scheduler
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            if shift is None and scheduler.config.get("use_dynamic_shifting", False):
                raise ValueError(
                    "This WanPipeline's scheduler shifts dynamically, but WanPipeline passes no mu, so "
                    "it cannot sample with it. Set EGRPOConfig.shift (Wan 2.1: 3.0 at 480p, 5.0 at "
                    "720p)."
                )
            overrides = {} if shift is None else {"shift": float(shift), "use_dynamic_shifting": False}
            return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, **overrides)
        flow_shift = scheduler.config.get("flow_shift") if shift is None else shift
        if flow_shift is None:
            raise ValueError(
                f"The pipeline's {type(scheduler).__name__} has no flow_shift: set EGRPOConfig.shift "
                "(Wan 2.1: 3.0 at 480p, 5.0 at 720p)."
            )
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=scheduler.config.num_train_timesteps, shift=float(flow_shift)
        )

    def schedule(self, num_steps: int, shift: float | None) -> Schedule:
        """``WanPipeline``'s Euler schedule: :meth:`euler_scheduler`'s ``set_timesteps(num_steps)``, computed by the
        scheduler's own code. Unlike the image pipelines, ``WanPipeline`` passes no sigmas, so the scheduler spaces
        them itself: ``linspace(1, shift(1/1000), T)``, shifted ``sigma -> s sigma / (1 + (s - 1) sigma)``, with 0
        appended."""
        scheduler = self.euler_scheduler(shift)
        scheduler.set_timesteps(num_steps, device="cpu")
        return Schedule(
            sigmas=scheduler.sigmas.detach().to(torch.float32).cpu(),
            timesteps=scheduler.timesteps.detach().to(torch.float32).cpu(),
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """UMT5 embeddings ``[P, max_sequence_length, D]`` of the prompts and, with guidance, of the negative
        prompt (one row per prompt, so that :func:`select_rows` indexes both alike)."""
        prompt_embeds, negative_embeds = self.pipeline.encode_prompt(
            prompt=prompts,
            negative_prompt=[self.negative_prompt] * len(prompts),
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        conditioning = {"prompt_embeds": prompt_embeds}
        if self.do_classifier_free_guidance:
            conditioning["negative_prompt_embeds"] = negative_embeds
        return conditioning

    def initial_noise(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Latents ``[B, 16, k + 1, H/8, W/8]``: the draw ``WanPipeline.prepare_latents`` makes with this generator
        (always in float32, as the pipeline)."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (
            batch_size,
            self.transformer.config.in_channels,
            self.latent_frames,
            self.latent_height,
            self.latent_width,
        )
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def velocity(self, model, latents, timesteps, conditioning):
        """The policy's velocity ``[B, 16, k + 1, H/8, W/8]``: the transformer's, or the classifier-free-guided
        combination of a conditional and a negative pass made in one batched call (rows ``[cond, negative]``)."""
        hidden_states = latents.to(self.transformer_dtype)
        timestep = timesteps.to(latents.device)  # the pipeline passes the scheduler's float32 timestep as it is
        embeds = conditioning["prompt_embeds"]
        if self.do_classifier_free_guidance:
            hidden_states = torch.cat([hidden_states, hidden_states])
            timestep = torch.cat([timestep, timestep])
            embeds = torch.cat([embeds, conditioning["negative_prompt_embeds"]])
        if self.pipeline.config.get("expand_timesteps", False):
            timestep = timestep[:, None].expand(-1, self.num_video_tokens)  # Wan 2.2 TI2V: one per token
        velocity = model(
            hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=embeds, return_dict=False
        )[0].to(torch.float32)
        if self.do_classifier_free_guidance:
            cond, negative = velocity.chunk(2)
            velocity = negative + self.guidance_scale * (cond - negative)
        return velocity

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents with the VAE's per-channel normalization undone (in the pipeline's order of operations): what
        the VAE decoder takes."""
        return unnormalize_wan_vae_latents(self.pipeline.vae, latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Videos ``[B, F, 3, H, W]`` in [0, 1] (what ``pipeline(..., output_type="pt").frames`` holds)."""
        return self.vae_images(self.vae_latents(latents)).transpose(1, 2)
