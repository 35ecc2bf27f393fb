"""The registry of pipeline families that ``tests/test_conformance.py`` runs every shared check on.

One :class:`Family` entry per pipeline holds everything the shared checks need: how to build its tiny pipeline and
its trainer, how to sample with the pipeline's own ``__call__`` (the reference every check compares with), the
sampling cases each check covers (with and without classifier-free guidance where the family has it) and the few
facts that differ between families (noise layout, default guidance, recipe lines). A new adapter gets every check
by adding one entry to :data:`FAMILIES`; a new check is one test in ``test_conformance.py`` parametrized over
:data:`FAMILIES` that reads these fields (add a field here when a family needs a special case, rather than
weakening the check for all). For example, a check that something run outside the trainer reproduces a trained
LoRA's samples needs only :meth:`Family.trainer` with :attr:`Family.lora`, :attr:`Family.build` and
:attr:`Family.sample`, as ``test_saved_lora_loads_into_a_fresh_pipeline`` uses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from PIL import Image
from trl import TrlParser

from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer, plan_merges
from trl_flow_egrpo.adapters import (
    Flux2Adapter,
    FluxAdapter,
    FluxKontextAdapter,
    QwenImageAdapter,
    QwenImageEditAdapter,
    SD3Adapter,
    WanAdapter,
    ZImageAdapter,
    get_adapter,
)
from trl_flow_egrpo.data import check_source_images, load_prompts
from trl_flow_egrpo.registry import build_reward
from trl_flow_egrpo.rewards import ColorReward, FrameAverageReward
from trl_flow_egrpo.schedule import dynamic_shift_mu, scheduler_schedule
from trl_flow_egrpo.tiny import (
    build_tiny_flux2_klein_pipeline,
    build_tiny_flux2_pipeline,
    build_tiny_flux_kontext_pipeline,
    build_tiny_flux_pipeline,
    build_tiny_qwenimage_edit_pipeline,
    build_tiny_qwenimage_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_wan_pipeline,
    build_tiny_zimage_pipeline,
)

PROMPTS = ["a red apple", "a fire truck", "a cat on a mat", "sunset over the sea", "a rose", "a bowl of cherries"]
EVAL_PROMPTS = ["a red apple", "a rose", "a car", "the sea", "a cat", "a bowl of cherries", "fire", "a house"]
NEGATIVE = "blurry, dark"

BASE_CONFIG = dict(
    num_inference_steps=4,
    num_active_steps=2,
    num_generations=6,
    prompts_per_device=2,
    shift=None,
    mixed_precision="no",
    learning_rate=3e-2,
    clip_range=1e-2,
    lora_r=8,
    lora_alpha=8,
    rollout_batch_size=64,
    per_device_train_batch_size=4,
    save_steps=0,
    max_steps=1,
    disable_tqdm=True,
    seed=0,
)
"""The trainer settings every family's checks start from: 4 steps (2 trained), 6 rollouts per group, float32, the
pipeline's own schedule (``shift=None``)."""


def _as_is(pipeline, adapter, latents):
    return latents


def source_images(prompts: list[str], height: int, width: int) -> list[Image.Image]:
    """Test source images for an image-editing family: one RGB image per prompt, seeded by the prompt's text (so a
    prompt has the same source wherever it is sampled) and smooth enough that a VAE keeps its content."""
    images = []
    for prompt in prompts:
        rng = np.random.default_rng(zlib.crc32(prompt.encode()))
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        images.append(Image.fromarray(coarse, mode="RGB").resize((width, height), Image.BILINEAR))
    return images


@dataclass(frozen=True)
class Sampling:
    """One way a check samples a family: guidance scale and negative prompt, and what they must mean."""

    id: str
    """Names the case in test ids (``sd3-cfg``)."""
    guidance_scale: float | None = None
    """None: the family's default."""
    negative_prompt: str = ""
    cfg: bool = False
    """Whether this makes the adapter run classifier-free guidance (asserted, so a case cannot silently test the
    other mode)."""
    shift: float | None = None
    """A static shift for the parity check (the pipeline then gets a static-shift scheduler too)."""
    pipeline_kwargs: dict = field(default_factory=dict)
    """Extra builder arguments (e.g. ``is_distilled=True``)."""
    config: dict = field(default_factory=dict)
    """Extra trainer settings (e.g. ``algorithm``)."""
    guidance_matters: bool = True
    """Whether another guidance scale changes the pipeline's sample (False: step-distilled FLUX.2 [klein])."""

    def adapter_kwargs(self) -> dict:
        """The adapter arguments of this case."""
        return dict(guidance_scale=self.guidance_scale, negative_prompt=self.negative_prompt)

    def trainer_overrides(self) -> dict:
        """The trainer settings of this case."""
        return dict(guidance_scale=self.guidance_scale, negative_prompt=self.negative_prompt, **self.config)


@dataclass(frozen=True)
class Family:
    """A pipeline family as the shared checks see it."""

    id: str
    """Names the family in test ids."""
    build: Callable
    """``build(seed=0, **kwargs)``: the tiny pipeline (``trl_flow_egrpo.tiny``)."""
    adapter_class: type
    """The adapter :func:`~trl_flow_egrpo.adapters.get_adapter` must pick for the pipeline."""
    default_guidance_scale: float
    """The adapter's default, which must be the pipeline's own default."""
    size: int
    """Height and width of the checks' images (a multiple of 16 the tiny pipeline supports)."""
    sequence_length: int
    """``max_sequence_length`` that holds every test prompt after the family's template."""
    sample: Callable
    """``sample(pipeline, adapter, prompts, noise, num_steps, output_type)``: ``pipeline.__call__`` from ``noise``
    (the adapter's layout) with the adapter's guidance, negative prompt and size, returning images (or videos)
    for ``"pt"`` and what the pipeline returns for ``"latent"``."""
    noise_shape: tuple[int, ...]
    """The adapter's noise shape (without the batch) at height :attr:`size`, width twice that."""
    pipeline_noise: Callable
    """``pipeline_noise(pipeline, adapter, batch_size, generator)``: the pipeline's own initial noise (its
    ``prepare_latents``)."""
    parity: tuple[Sampling, ...]
    """The cases of the parity check (with and without classifier-free guidance where the family has it)."""
    on_policy: tuple[Sampling, ...]
    """The cases of the on-policy ratio check (each guidance mode, and other rollout paths where they differ)."""
    lora: Sampling
    """The case of the LoRA round trip (with guidance where the family has it: the CFG pair must use the LoRA)."""
    negative_refusals: tuple[tuple[Sampling, str], ...]
    """Cases where a negative prompt has no pass to go to, each with the error it must raise (a regex)."""
    noise_as_drawn: Callable = _as_is
    """``noise_as_drawn(pipeline, adapter, noise)``: the adapter's noise in the layout of :attr:`pipeline_noise`."""
    latents_as_returned: Callable = _as_is
    """``latents_as_returned(pipeline, adapter, latents)``: the adapter's latents as
    ``pipeline(output_type="latent")`` returns them."""
    adapter_kwargs: dict = field(default_factory=dict)
    """Extra adapter arguments of every check (Wan: ``num_frames``)."""
    config: dict = field(default_factory=dict)
    """Family settings on top of :data:`BASE_CONFIG`."""
    training: dict = field(default_factory=dict)
    """Settings of the training check (a run long enough that the gain is beyond noise)."""
    reward: Callable = ColorReward
    """The weight-free reward of the training checks."""
    parity_steps: int = 6
    """Sampling steps of the parity check."""
    parity_tolerance: float = 1e-5
    """Largest absolute difference from the pipeline's sample (float32)."""
    parity_rtol: float = 0.0
    """Relative tolerance on top of :attr:`parity_tolerance`."""
    lora_modules: tuple[str, ...] = ()
    """Transformer modules whose LoRA weights the saved file must hold (the default targets reach them)."""
    recipe: str | None = None
    """The family's recipe in ``examples/recipes/`` that states its merge plan; None: none does."""
    recipe_facts: Callable | None = None
    """``recipe_facts(text, script_args, config, pipeline, adapter, schedule)``: the family's own recipe lines."""
    card: tuple[tuple[str, dict], ...] = ()
    """Cases of the model-card check, each an id and trainer settings (``tests/card_snippet.py``): where the
    pipeline's own defaults differ from the trainer's (a static shift, the scheduler's own shift, guidance, a
    negative prompt, a prompt length below the pipeline's default)."""
    edits_images: bool = False
    """Whether the family edits a source image: its dataset, encodings and samples then carry
    :func:`source_images` of the prompts (the pipeline's sample at the family's size)."""

    def images(self, prompts: list[str]) -> list[Image.Image] | None:
        """The source images of ``prompts`` at the family's size for an image-editing family, else None."""
        return source_images(prompts, self.size, self.size) if self.edits_images else None

    def encode(self, adapter, prompts: list[str]):
        """``adapter.encode_prompts`` of ``prompts``, with their source images for an image-editing family."""
        images = self.images(prompts)
        return adapter.encode_prompts(prompts) if images is None else adapter.encode_prompts(prompts, images)

    def adapter(self, pipeline, **kwargs):
        """The adapter of ``pipeline`` at the family's size and sequence length."""
        values = dict(height=self.size, width=self.size, max_sequence_length=self.sequence_length)
        values.update(self.adapter_kwargs)
        values.update(kwargs)
        return get_adapter(pipeline, **values)

    def trainer(
        self,
        output_dir,
        pipeline=None,
        sampling: Sampling | None = None,
        eval_dataset=None,
        eval_reward_fns=None,
        **overrides,
    ) -> EGRPOTrainer:
        """An EGRPOTrainer on the family's tiny pipeline (seed 0) with :data:`BASE_CONFIG`, the family's settings,
        ``sampling``'s guidance, then ``overrides``; trained on :data:`PROMPTS` with :attr:`reward`."""
        values = dict(BASE_CONFIG, output_dir=str(output_dir), height=self.size, width=self.size)
        values.update(max_sequence_length=self.sequence_length, **self.config)
        if sampling is not None:
            values.update(sampling.trainer_overrides())
        values.update(overrides)
        if pipeline is None:
            pipeline = self.build(seed=0, **(sampling.pipeline_kwargs if sampling else {}))
        columns = {"prompt": PROMPTS}
        if self.edits_images:  # sources of another size than the output: the trainer resizes them
            columns["source_image"] = source_images(PROMPTS, self.size // 2, self.size)
        return EGRPOTrainer(
            EGRPOConfig(**values),
            pipeline,
            [self.reward()],
            Dataset.from_dict(columns),
            eval_dataset=eval_dataset,
            eval_reward_fns=eval_reward_fns,
        )

    def cases(self, check: str) -> list:
        """``pytest.param(family, sampling)`` for each case of ``check`` (``"parity"``, ``"on_policy"``), with ids
        ``<family>-<case>``."""
        return [pytest.param(self, case, id=f"{self.id}-{case.id}") for case in getattr(self, check)]

    def with_(self, **changes) -> Family:
        """This family with some fields replaced."""
        return dataclasses.replace(self, **changes)


def _sd3_sigmas(num_steps: int) -> np.ndarray:
    # The unshifted sigmas the SD3 adapter's schedule starts from; given to the pipeline so both sample alike.
    return np.linspace(1.0, 1.0 / num_steps, num_steps)


def _call(pipeline, output_type, **kwargs):
    pipeline.set_progress_bar_config(disable=True)
    output = pipeline(output_type=output_type, **kwargs)
    return output.frames if hasattr(output, "frames") else output.images


def _flux_sample(pipeline, adapter, prompts, noise, num_steps, output_type, **extra):
    # FluxPipeline computes its own schedule (dynamic shift) unless the test gave it a static-shift scheduler.
    return _call(
        pipeline,
        output_type,
        prompt=prompts,
        latents=noise.clone(),
        num_inference_steps=num_steps,
        guidance_scale=adapter.guidance_scale,
        height=adapter.height,
        width=adapter.width,
        max_sequence_length=adapter.max_sequence_length,
        **extra,
    )


def _flux_kontext_sample(pipeline, adapter, prompts, noise, num_steps, output_type):
    # The sources at the run's size, kept there (_auto_resize=False), and the output size kept (FluxKontextPipeline
    # rescales it to max_area, one megapixel by default).
    return _flux_sample(
        pipeline,
        adapter,
        prompts,
        noise,
        num_steps,
        output_type,
        image=source_images(prompts, adapter.height, adapter.width),
        _auto_resize=False,
        max_area=adapter.height * adapter.width,
    )


def _sd3_sample(pipeline, adapter, prompts, noise, num_steps, output_type):
    return _call(
        pipeline,
        output_type,
        prompt=prompts,
        negative_prompt=[adapter.negative_prompt] * len(prompts),
        num_inference_steps=num_steps,
        sigmas=_sd3_sigmas(num_steps),
        guidance_scale=adapter.guidance_scale,
        height=adapter.height,
        width=adapter.width,
        latents=noise.clone(),
        max_sequence_length=adapter.max_sequence_length,
    )


def _flux2_sample(pipeline, adapter, prompts, noise, num_steps, output_type):
    # The pipeline computes its own schedule (sigmas=None: linspace(1, 1/T, T) and its own mu).
    kwargs = {}
    if adapter.do_classifier_free_guidance and adapter.negative_prompt:
        # Flux2KleinPipeline has no negative_prompt argument (it uses ""); other negatives go in as embeddings.
        kwargs["negative_prompt_embeds"] = pipeline.encode_prompt(
            [adapter.negative_prompt] * len(prompts), max_sequence_length=adapter.max_sequence_length
        )[0]
    return _call(
        pipeline,
        output_type,
        prompt=prompts,
        latents=noise.clone(),
        num_inference_steps=num_steps,
        guidance_scale=adapter.guidance_scale,
        height=adapter.height,
        width=adapter.width,
        max_sequence_length=adapter.max_sequence_length,
        **kwargs,
    )


def _qwenimage_sample(pipeline, adapter, prompts, noise, num_steps, output_type, **extra):
    # true_cfg_scale is the guidance; the pipeline computes its own schedule (mu and terminal stretch).
    negative = (
        {"negative_prompt": [adapter.negative_prompt] * len(prompts)} if adapter.do_classifier_free_guidance else {}
    )
    return _call(
        pipeline,
        output_type,
        prompt=prompts,
        latents=noise.clone(),
        num_inference_steps=num_steps,
        true_cfg_scale=adapter.guidance_scale,
        height=adapter.height,
        width=adapter.width,
        max_sequence_length=adapter.max_sequence_length,
        **negative,
        **extra,
    )


def _qwenimage_edit_sample(pipeline, adapter, prompts, noise, num_steps, output_type):
    # QwenImageEditPipeline resizes a single source image to about one megapixel (a list it passes to the text
    # encoder as given): sources already at that size make both the same.
    height, width = adapter.source_height, adapter.source_width
    images = [
        pipeline.image_processor.resize(image, height, width)
        for image in source_images(prompts, adapter.height, adapter.width)
    ]
    return _qwenimage_sample(pipeline, adapter, prompts, noise, num_steps, output_type, image=images)


def _zimage_sample(pipeline, adapter, prompts, noise, num_steps, output_type):
    # ZImagePipeline rewrites the prompt list it is given (chat template), so it gets a copy.
    negative = [adapter.negative_prompt] * len(prompts) if adapter.do_classifier_free_guidance else None
    return _call(
        pipeline,
        output_type,
        prompt=list(prompts),
        negative_prompt=negative,
        latents=noise.clone(),
        num_inference_steps=num_steps,
        guidance_scale=adapter.guidance_scale,
        height=adapter.height,
        width=adapter.width,
        max_sequence_length=adapter.max_sequence_length,
    )


def _wan_sample(pipeline, adapter, prompts, noise, num_steps, output_type):
    # The released UniPC scheduler is a multistep solver: the pipeline samples with the adapter's Euler scheduler,
    # spacing the sigmas itself. Returns the pipeline's frames (latents for output_type="latent").
    negative = (
        {"negative_prompt": [adapter.negative_prompt] * len(prompts)} if adapter.do_classifier_free_guidance else {}
    )
    pipeline.scheduler = adapter.euler_scheduler(None)
    return _call(
        pipeline,
        output_type,
        prompt=prompts,
        latents=noise.clone(),
        num_inference_steps=num_steps,
        guidance_scale=adapter.guidance_scale,
        height=adapter.height,
        width=adapter.width,
        num_frames=adapter.num_frames,
        max_sequence_length=adapter.max_sequence_length,
        **negative,
    )


def _prepare_latents(channels: int, packed: bool = False) -> Callable:
    # The pipeline's prepare_latents(batch, channels, height, width, dtype, device, generator); packed pipelines
    # return (latents, ids).
    def pipeline_noise(pipeline, adapter, batch_size, generator):
        noise = pipeline.prepare_latents(
            batch_size, channels, adapter.height, adapter.width, torch.float32, "cpu", generator
        )
        return noise[0] if packed else noise

    return pipeline_noise


def _wan_noise(pipeline, adapter, batch_size, generator):
    return pipeline.prepare_latents(
        batch_size, 16, adapter.height, adapter.width, adapter.num_frames, torch.float32, "cpu", generator
    )


def _flux2_returned_latents(pipeline, adapter, latents):
    # Flux2Pipeline returns its token latents; Flux2KleinPipeline the VAE's (de-normalized, un-patchified) ones.
    if type(pipeline).__name__ == "Flux2Pipeline":
        return pipeline._pack_latents(latents)
    return adapter.vae_latents(latents)


def _flux2_recipe_facts(text, script_args, config, pipeline, adapter, schedule):
    assert f"({type(pipeline).__name__}" in text
    mu = compute_empirical_mu(adapter.num_image_tokens, config.num_inference_steps)
    assert (
        f"compute_empirical_mu({adapter.num_image_tokens} tokens, {config.num_inference_steps} steps) = {mu:.4f}"
        in (text)
    )


def _scheduler_mu(pipeline, adapter) -> float:
    """The dynamic shift ``mu`` the pipeline's scheduler config gives the adapter's image-token count."""
    scheduler = pipeline.scheduler.config
    return dynamic_shift_mu(
        adapter.num_image_tokens,
        scheduler.base_image_seq_len,
        scheduler.max_image_seq_len,
        scheduler.base_shift,
        scheduler.max_shift,
    )


def _qwenimage_recipe_facts(text, script_args, config, pipeline, adapter, schedule):
    assert adapter.do_classifier_free_guidance
    mu = _scheduler_mu(pipeline, adapter)
    assert f"mu = {mu:.4f} for {adapter.num_image_tokens} image tokens" in text


def _edit_recipe_facts(text, script_args, config, pipeline, adapter, schedule):
    # The recipe's edit dataset: every source image validates, the reward reads its columns, the counts are stated.
    # Its paths are relative to the repository root, where the recipe is launched.
    with contextlib.chdir(os.path.dirname(os.path.dirname(RECIPES))):
        train, test = (load_prompts(name) for name in (script_args.dataset_name, script_args.eval_dataset_name))
        for role, dataset in (("train_dataset", train), ("eval_dataset", test)):
            check_source_images(dataset, config.image_column, role, type(pipeline).__name__)
    assert f"{len(train)} training and {len(test)} test edits" in text.replace("\n# ", " ")
    for name in script_args.reward_funcs:
        build_reward(name)
    assert script_args.num_eval_prompts == 0 and f"all {len(test)} test edits" in text


def _flux_kontext_recipe_facts(text, script_args, config, pipeline, adapter, schedule):
    _edit_recipe_facts(text, script_args, config, pipeline, adapter, schedule)
    mu = _scheduler_mu(pipeline, adapter)
    assert config.shift is None and f"mu = {mu:.2f} for the {adapter.num_image_tokens} image tokens" in text


def _zimage_recipe_facts(text, script_args, config, pipeline, adapter, schedule):
    assert adapter.do_classifier_free_guidance
    assert f"{adapter.num_image_tokens} image tokens" in text
    assert f"sigma 1 -> {float(schedule.sigmas[config.num_active_steps]):.2f}" in text
    expected = scheduler_schedule(pipeline.scheduler, config.num_inference_steps).sigmas
    torch.testing.assert_close(schedule.sigmas, expected, rtol=0, atol=1e-6)


def _wan_recipe_facts(text, script_args, config, pipeline, adapter, schedule):
    for name in script_args.reward_funcs + script_args.eval_reward_funcs:
        build_reward(name)
    assert adapter.do_classifier_free_guidance
    assert config.shift is not None  # the released UniPC scheduler's flow_shift is not the recipe's
    assert f"{adapter.latent_frames} latent frames, {adapter.num_video_tokens} video tokens" in text


_CFG_OFF = "classifier-free guidance is off"

FLUX = Family(
    id="flux",
    build=build_tiny_flux_pipeline,
    adapter_class=FluxAdapter,
    default_guidance_scale=3.5,
    size=64,
    sequence_length=32,
    sample=_flux_sample,
    noise_shape=(32, 64),
    pipeline_noise=_prepare_latents(16, packed=True),
    # The tiny scheduler shifts dynamically (configured shift 3.0): a static 2.0 is the adapter's doing alone.
    parity=(Sampling("static-shift-2", shift=2.0), Sampling("pipeline-shift")),
    on_policy=(Sampling("guidance-embedding"),),
    lora=Sampling("guidance-embedding"),
    negative_refusals=(
        (
            Sampling("no-negative-pass", None, NEGATIVE),
            r"is not allowed with FluxPipeline: .*Set negative_prompt to ''",
        ),
    ),
    parity_steps=16,
    parity_rtol=1e-5,
    training=dict(max_steps=12, prompts_per_device=4),
    recipe="flux_dev_hps.yaml",
    card=(
        ("static-shift", dict(height=64, width=64, max_sequence_length=32, shift=3.0)),
        ("full-fine-tune", dict(height=64, width=64, max_sequence_length=32, shift=None, use_peft=False)),
    ),
)

FLUX_KONTEXT = FLUX.with_(
    id="flux-kontext",
    build=build_tiny_flux_kontext_pipeline,
    adapter_class=FluxKontextAdapter,
    sample=_flux_kontext_sample,
    # FluxKontextPipeline.prepare_latents takes the source image first (None: the noise alone).
    pipeline_noise=lambda pipeline, adapter, batch_size, generator: pipeline.prepare_latents(
        None, batch_size, 16, adapter.height, adapter.width, torch.float32, "cpu", generator
    )[0],
    edits_images=True,
    negative_refusals=(
        (
            Sampling("no-negative-pass", None, NEGATIVE),
            r"is not allowed with FluxKontextPipeline: .*Set negative_prompt to ''",
        ),
    ),
    recipe="flux_kontext_dev_edit.yaml",
    recipe_facts=_flux_kontext_recipe_facts,
    card=(("source-image", dict(height=64, width=64, max_sequence_length=32, shift=None)),),
)

SD3 = Family(
    id="sd3",
    build=build_tiny_sd3_pipeline,
    adapter_class=SD3Adapter,
    default_guidance_scale=4.5,
    size=64,
    sequence_length=32,
    sample=_sd3_sample,
    noise_shape=(16, 8, 16),
    pipeline_noise=_prepare_latents(16),
    parity=(Sampling("no-cfg", 1.0, NEGATIVE), Sampling("cfg", 4.5, NEGATIVE, cfg=True)),
    on_policy=(Sampling("no-cfg", 1.0), Sampling("cfg", 4.5, NEGATIVE, cfg=True)),
    lora=Sampling("cfg", 4.5, NEGATIVE, cfg=True),
    negative_refusals=(
        (Sampling("no-cfg", 1.0, NEGATIVE), f"would never be used: {_CFG_OFF} for StableDiffusion3Pipeline"),
    ),
    config=dict(guidance_scale=1.0),
    # 4 prompts per iteration: with 2, the gain after 20 iterations depends on the seed (some seeds lose).
    training=dict(max_steps=20, prompts_per_device=4),
    recipe="sd3_5_medium_pickscore.yaml",
    card=(("cfg-negative", dict(height=64, width=64, max_sequence_length=32, negative_prompt="blurry")),),
)

FLUX2 = Family(
    id="flux2",
    build=build_tiny_flux2_pipeline,
    adapter_class=Flux2Adapter,
    default_guidance_scale=4.0,
    size=32,
    sequence_length=32,
    sample=_flux2_sample,
    noise_shape=(128, 2, 4),
    pipeline_noise=_prepare_latents(32, packed=True),
    noise_as_drawn=lambda pipeline, adapter, noise: pipeline._pack_latents(noise),  # the pipeline draws tokens
    latents_as_returned=_flux2_returned_latents,
    # The guidance embedding at two scales (FLUX.2 [dev] has no classifier-free guidance).
    parity=(Sampling("embedding-2.5", 2.5), Sampling("embedding-4", 4.0)),
    on_policy=(Sampling("embedding-4", 4.0),),
    lora=Sampling("embedding-4", 4.0),
    negative_refusals=(
        (
            Sampling("embedding", 4.0, NEGATIVE),
            r"Flux2Pipeline \(FLUX.2 \[dev\]\) has no negative prompt.*Set negative_prompt",
        ),
    ),
    training=dict(max_steps=20, prompts_per_device=4),
    lora_modules=("single_transformer_blocks.0.attn.to_out", "single_transformer_blocks.1.attn.to_out"),
    recipe="flux2_dev_lora.yaml",
    recipe_facts=_flux2_recipe_facts,
    card=(("scheduler-shift", dict(height=32, width=32, max_sequence_length=32, shift=None)),),
)

FLUX2_KLEIN = FLUX2.with_(
    id="flux2-klein",
    build=build_tiny_flux2_klein_pipeline,
    sequence_length=48,  # Qwen3's chat template is longer than Mistral's
    # Classifier-free guidance against the pipeline's empty prompt and against another one, without guidance, and
    # the step-distilled model (which ignores the scale).
    parity=(
        Sampling("cfg", 4.0, cfg=True),
        Sampling("cfg-negative", 3.0, NEGATIVE, cfg=True),
        Sampling("no-cfg", 1.0),
        Sampling("distilled", 4.0, pipeline_kwargs=dict(is_distilled=True), guidance_matters=False),
    ),
    on_policy=(Sampling("cfg", 4.0, cfg=True),),
    lora=Sampling("cfg-negative", 4.0, NEGATIVE, cfg=True),
    negative_refusals=(
        (Sampling("no-cfg", 1.0, NEGATIVE), f"{_CFG_OFF}.*Set negative_prompt to ''"),
        (
            Sampling("distilled", 4.0, NEGATIVE, pipeline_kwargs=dict(is_distilled=True)),
            "step-distilled.*Set negative_prompt",
        ),
    ),
    # The tiny [klein] learns more slowly than [dev]: after 20 iterations at 3e-2 (with or without guidance) its
    # gain was within noise; at 1e-1 without guidance it measured 0.015 (4 standard errors: 0.004).
    training=dict(max_steps=20, prompts_per_device=4, learning_rate=1e-1, guidance_scale=1.0),
    recipe="flux2_klein_base_lora.yaml",
    card=(
        (
            "cfg-negative",
            dict(height=32, width=32, max_sequence_length=48, shift=None, negative_prompt="blurry"),
        ),
    ),
)

QWENIMAGE = Family(
    id="qwenimage",
    build=build_tiny_qwenimage_pipeline,
    adapter_class=QwenImageAdapter,
    default_guidance_scale=4.0,
    size=32,
    sequence_length=32,
    sample=_qwenimage_sample,
    noise_shape=(8, 64),
    pipeline_noise=_prepare_latents(16),
    parity=(
        Sampling("cfg-model-card-negative", 4.0, " ", cfg=True),
        Sampling("cfg-negative", 3.0, NEGATIVE, cfg=True),
        Sampling("no-cfg", 1.0),
    ),
    on_policy=(Sampling("no-cfg", 1.0), Sampling("cfg", 4.0, NEGATIVE, cfg=True)),
    lora=Sampling("cfg", 4.0, NEGATIVE, cfg=True),
    negative_refusals=(
        (Sampling("no-cfg", 1.0, NEGATIVE), f"{_CFG_OFF} .*Set guidance_scale > 1 to use it, or negative_prompt"),
    ),
    config=dict(guidance_scale=1.0),
    training=dict(max_steps=20, prompts_per_device=4),
    recipe="qwen_image_lora.yaml",
    recipe_facts=_qwenimage_recipe_facts,
    card=(("scheduler-shift", dict(height=32, width=32, max_sequence_length=32, shift=None)),),
)

QWENIMAGE_EDIT = QWENIMAGE.with_(
    id="qwenimage-edit",
    build=build_tiny_qwenimage_edit_pipeline,
    adapter_class=QwenImageEditAdapter,
    sequence_length=64,  # after the 64 dropped tokens, 18 of the tiny tokenizer's template remain, and the prompt
    sample=_qwenimage_edit_sample,
    pipeline_noise=lambda pipeline, adapter, batch_size, generator: pipeline.prepare_latents(
        None, batch_size, 16, adapter.height, adapter.width, torch.float32, "cpu", generator
    )[0],
    edits_images=True,
    # Every call carries the 4096 tokens of the ~1 MP source: few steps and rollouts keep the checks under minutes.
    # Those tokens dominate the 4 noisy tokens' attention in the tiny model, so another guidance scale moves its
    # 32x32 sample by less than 1e-4 (measured 6e-5 and 7e-5): the parity check cannot see guidance matter there, and
    # tests/test_edit_pipelines.py checks that it changes the velocity instead.
    parity=(
        Sampling("cfg-model-card-negative", 4.0, " ", cfg=True, guidance_matters=False),
        Sampling("no-cfg", 1.0, guidance_matters=False),
    ),
    on_policy=(Sampling("cfg", 4.0, NEGATIVE, cfg=True),),
    lora=Sampling("cfg", 4.0, NEGATIVE, cfg=True),
    parity_steps=3,
    config=dict(guidance_scale=1.0, num_generations=2, num_active_steps=1),
    # Measured in .venv (gain of the training check, its s.e.): +0.0208 (0.0003) at seed 0, +0.0114 (0.0003) at
    # seed 1, about 290 s each on a loaded 2-core machine; Qwen-Image's 20 iterations at its rate gained +0.0017.
    training=dict(max_steps=16, prompts_per_device=4, learning_rate=1e-1),
    recipe="qwen_image_edit.yaml",
    recipe_facts=lambda *args: (_qwenimage_recipe_facts(*args), _edit_recipe_facts(*args)),
    card=(("source-image", dict(height=32, width=32, max_sequence_length=64, shift=None)),),
)
"""Qwen-Image-Edit: not in :data:`FAMILIES`, because every transformer call carries its ~1 MP source's 4096 tokens
(minutes per check on a CPU); ``tests/test_edit_pipelines.py`` runs the shared parity, on-policy, training, LoRA,
model-card and recipe checks on it (marked slow)."""

ZIMAGE = Family(
    id="zimage",
    build=build_tiny_zimage_pipeline,
    adapter_class=ZImageAdapter,
    default_guidance_scale=5.0,  # ZImagePipeline.__call__'s
    size=32,
    sequence_length=32,
    sample=_zimage_sample,
    noise_shape=(16, 4, 8),
    pipeline_noise=_prepare_latents(16),
    parity=(
        Sampling("cfg-negative", 4.0, NEGATIVE, cfg=True),
        Sampling("cfg-empty-negative", 5.0, cfg=True),
        Sampling("no-cfg-turbo", 0.0),
    ),
    on_policy=(Sampling("no-cfg", 0.0), Sampling("cfg", 4.0, NEGATIVE, cfg=True)),
    lora=Sampling("cfg", 4.0, NEGATIVE, cfg=True),
    negative_refusals=(
        (
            Sampling("no-cfg", 0.0, NEGATIVE),
            f"{_CFG_OFF} .*Set guidance_scale > 0 to use it .* or negative_prompt to ''",
        ),
    ),
    config=dict(guidance_scale=0.0),  # no guidance, Z-Image-Turbo's way
    training=dict(max_steps=20, prompts_per_device=4),
    # The default targets reach every block kind and the final projection.
    lora_modules=(
        "noise_refiner.0.attention.to_q",
        "context_refiner.0.feed_forward.w2",
        "layers.1.attention.to_out.0",
        "all_final_layer.2-1.linear",
    ),
    recipe="z_image_lora.yaml",
    recipe_facts=_zimage_recipe_facts,
    card=(("scheduler-shift", dict(height=32, width=32, max_sequence_length=32, shift=None)),),
)

WAN = Family(
    id="wan",
    build=build_tiny_wan_pipeline,
    adapter_class=WanAdapter,
    default_guidance_scale=5.0,
    size=32,
    sequence_length=32,
    sample=_wan_sample,
    noise_shape=(16, 2, 4, 8),
    pipeline_noise=_wan_noise,
    parity=(
        Sampling("cfg-negative", 5.0, NEGATIVE, cfg=True),
        Sampling("cfg-pipeline-default-negative", 5.0, cfg=True),
        Sampling("no-cfg", 1.0),
    ),
    # The trajectory algorithms (Flow-GRPO, MixGRPO) run their own rollout path on the same 5-D latents.
    on_policy=(
        Sampling("no-cfg", 1.0),
        Sampling("cfg", 5.0, NEGATIVE, cfg=True),
        Sampling("flow-grpo", 1.0, config=dict(algorithm="flow-grpo")),
        Sampling("mix-grpo", 1.0, config=dict(algorithm="mix-grpo")),
    ),
    lora=Sampling("cfg", 5.0, NEGATIVE, cfg=True),
    negative_refusals=((Sampling("no-cfg", 1.0, NEGATIVE), f"{_CFG_OFF} .*negative_prompt to ''"),),
    adapter_kwargs=dict(num_frames=5),
    config=dict(guidance_scale=1.0, num_frames=5),
    training=dict(max_steps=12, learning_rate=5e-2),
    reward=lambda: FrameAverageReward(ColorReward()),
    recipe="wan2_1_t2v_1_3b_lora.yaml",
    recipe_facts=_wan_recipe_facts,
    # Wan's pipeline samples with a UniPC solver: the card swaps in the training schedule's Euler steps.
    card=(
        (
            "unipc-negative",
            dict(height=32, width=32, num_frames=5, max_sequence_length=32, shift=None, negative_prompt="static"),
        ),
    ),
)

FAMILIES = {family.id: family for family in (FLUX, SD3, FLUX2, FLUX2_KLEIN, QWENIMAGE, ZIMAGE, WAN, FLUX_KONTEXT)}
"""Every pipeline the adapters support, by id."""


RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "recipes")
"""The folder of the YAML recipes."""


def check_recipe_states_its_merge_plan(family: Family, recipe: str, script_arguments: type):
    """Check that ``examples/recipes/<recipe>``, a recipe for ``family``, parses (unknown keys raise), sets the
    paper's update (``optimizer_step: active_step``) and states the ``# merge plan:`` and ``Cost:`` lines that
    ``plan_merges`` computes for its schedule, then the family's :attr:`Family.recipe_facts`.

    Args:
        family: the recipe's pipeline family.
        recipe: the recipe's file name in ``examples/recipes/``.
        script_arguments: the script's argument class parsed next to ``EGRPOConfig`` (``examples/hpd.py``'s).

    Returns:
        ``(script_args, config, plan, text)``: the parsed recipe, its merge plan and its text, for a recipe's own
        further checks.
    """
    path = os.path.join(RECIPES, recipe)
    script_args, config = TrlParser((script_arguments, EGRPOConfig)).parse_yaml_file(path)  # unknown keys raise
    with open(path) as handle:
        text = handle.read()
    # The tiny pipeline has the family's VAE factor, patch size and scheduler config, so at the recipe's size (and
    # frames) its schedule is the one the real model samples with.
    pipe = family.build()
    adapter = get_adapter(
        pipe,
        height=config.height,
        width=config.width,
        guidance_scale=config.guidance_scale,
        max_sequence_length=config.max_sequence_length,
        negative_prompt=config.negative_prompt,
        num_frames=config.num_frames,
    )
    assert config.optimizer_step == "active_step"
    num_steps = config.num_inference_steps
    schedule = adapter.schedule(num_steps, config.shift)
    plan = plan_merges(
        schedule.sigmas,
        config.noise_level,
        config.entropy_threshold,
        config.num_active_steps,
        config.merge_length,
        config.merge_windows,
    )
    assert "# merge plan: " + " ".join(f"({step.start}, {step.length})" for step in plan) + "\n" in text
    evaluations = num_steps + config.num_generations * sum(num_steps - step.end for step in plan)
    assert f"Cost: {evaluations} " in text
    if family.recipe_facts is not None:
        family.recipe_facts(text, script_args, config, pipe, adapter, schedule)
    return script_args, config, plan, text
