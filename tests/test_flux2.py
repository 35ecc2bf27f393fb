"""FLUX.2 through the adapter interface, on the tiny offline FLUX.2 [dev] and [klein] pipelines: the anchor is the
pipeline's own sample (guidance embedding; classifier-free guidance on and off; step-distilled), on-policy ratios
are 1, training raises a reward, the saved LoRA loads into a plain pipeline, and bad input is a clear error."""

import importlib.util
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu  # noqa: E402
from trl import TrlParser  # noqa: E402

from helpers import assert_training_raises_the_reward  # noqa: E402
from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer, plan_merges  # noqa: E402
from trl_flow_egrpo.adapters import Flux2Adapter, get_adapter  # noqa: E402
from trl_flow_egrpo.rewards import ColorReward  # noqa: E402
from trl_flow_egrpo.rollout import sample_rollouts  # noqa: E402
from trl_flow_egrpo.tiny import build_tiny_flux2_klein_pipeline, build_tiny_flux2_pipeline  # noqa: E402

PROMPTS = ["a red apple", "a fire truck", "a cat on a mat", "sunset over the sea", "a rose", "a bowl of cherries"]
EVAL_PROMPTS = ["a red apple", "a rose", "a car", "the sea", "a cat", "a bowl of cherries", "fire", "a house"]
NEGATIVE = "blurry, dark"
SIZE = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Token budgets that hold every prompt above after the chat template (Mistral's is shorter than Qwen3's).
SEQUENCE_LENGTH = {"dev": 32, "klein": 48, "klein-distilled": 48}
BUILDERS = {
    "dev": build_tiny_flux2_pipeline,
    "klein": build_tiny_flux2_klein_pipeline,
    "klein-distilled": lambda seed=0: build_tiny_flux2_klein_pipeline(seed=seed, is_distilled=True),
}


def flux2_trainer(output_dir, variant="dev", pipeline=None, **overrides) -> EGRPOTrainer:
    """An EGRPOTrainer on a tiny FLUX.2 pipeline: 32x32, 4 steps (2 trained), 6 rollouts per group, float32."""
    values = dict(
        output_dir=str(output_dir),
        height=SIZE,
        width=SIZE,
        max_sequence_length=SEQUENCE_LENGTH[variant],
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
    values.update(overrides)
    return EGRPOTrainer(
        EGRPOConfig(**values),
        pipeline or BUILDERS[variant](seed=0),
        [ColorReward()],
        Dataset.from_dict({"prompt": PROMPTS}),
    )


def pipeline_images(pipeline, adapter, prompts, noise, num_steps, output_type):
    """``pipeline.__call__`` from ``noise`` (the adapter's layout) with the adapter's guidance and negative prompt;
    the pipeline computes its own schedule (``sigmas=None``: ``linspace(1, 1/T, T)`` and its own mu)."""
    kwargs = {}
    if adapter.do_classifier_free_guidance and adapter.negative_prompt:
        # Flux2KleinPipeline has no negative_prompt argument (it uses ""); other negatives go in as embeddings.
        kwargs["negative_prompt_embeds"] = pipeline.encode_prompt(
            [adapter.negative_prompt] * len(prompts), max_sequence_length=adapter.max_sequence_length
        )[0]
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        prompt=prompts,
        latents=noise.clone(),
        num_inference_steps=num_steps,
        guidance_scale=adapter.guidance_scale,
        height=adapter.height,
        width=adapter.width,
        max_sequence_length=adapter.max_sequence_length,
        output_type=output_type,
        **kwargs,
    ).images


@torch.no_grad()
@pytest.mark.parametrize("variant", ["dev", "klein"])
def test_adapter_is_registered_and_draws_the_pipelines_noise(variant):
    pipe = BUILDERS[variant]()
    adapter = get_adapter(pipe, height=SIZE, width=64)
    assert isinstance(adapter, Flux2Adapter)
    assert adapter.guidance_scale == Flux2Adapter.default_guidance_scale == 4.0
    noise = adapter.initial_noise(3, torch.Generator().manual_seed(7))
    assert noise.shape == (3, 128, SIZE // 16, 64 // 16) and noise.dtype == torch.float32
    expected, _ = pipe.prepare_latents(3, 32, SIZE, 64, torch.float32, "cpu", torch.Generator().manual_seed(7))
    torch.testing.assert_close(pipe._pack_latents(noise), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="height=40: Flux2 needs image sizes that are positive multiples of 16"):
        get_adapter(pipe, height=40, width=SIZE)


@pytest.mark.parametrize("variant, guidance_scale", [("dev", 4.0), ("klein-distilled", 4.0), ("klein", 1.0)])
def test_negative_prompt_without_a_negative_pass_is_a_clear_error(tmp_path, variant, guidance_scale):
    reason = {
        "dev": "Flux2Pipeline \\(FLUX.2 \\[dev\\]\\) has no negative prompt",
        "klein-distilled": "step-distilled",
        "klein": "classifier-free guidance is off",
    }[variant]
    with pytest.raises(ValueError, match=f"negative_prompt='blurry, dark': .*{reason}.*Set negative_prompt to ''"):
        flux2_trainer(tmp_path, variant, guidance_scale=guidance_scale, negative_prompt=NEGATIVE)


# (variant, guidance, negative prompt): the guidance embedding at two scales; [klein] base with classifier-free
# guidance against the pipeline's empty prompt and against another one, and without guidance; distilled [klein].
PARITY_CASES = [
    pytest.param("dev", 2.5, "", id="dev-embedding-2.5"),
    pytest.param("dev", 4.0, "", id="dev-embedding-4"),
    pytest.param("klein", 4.0, "", id="klein-cfg-4"),
    pytest.param("klein", 3.0, NEGATIVE, id="klein-cfg-negative"),
    pytest.param("klein", 1.0, "", id="klein-no-cfg"),
    pytest.param("klein-distilled", 4.0, "", id="klein-distilled"),
]


@pytest.mark.parametrize("variant, guidance_scale, negative_prompt", PARITY_CASES)
def test_anchor_trajectory_is_the_pipelines_sample(variant, guidance_scale, negative_prompt):
    pipe = BUILDERS[variant]()
    adapter = get_adapter(
        pipe,
        height=SIZE,
        width=SIZE,
        guidance_scale=guidance_scale,
        max_sequence_length=SEQUENCE_LENGTH[variant],
        negative_prompt=negative_prompt,
    )
    assert adapter.do_classifier_free_guidance == (variant == "klein" and guidance_scale > 1)
    num_steps = 6
    schedule = adapter.schedule(num_steps, shift=None)  # the pipeline's own: dynamic, compute_empirical_mu
    prompts = PROMPTS[:2]
    noise = adapter.initial_noise(len(prompts), torch.Generator().manual_seed(0))
    plan = plan_merges(schedule.sigmas, 0.7, 2.2, 3, "adaptive", "overlap")
    # Batches of 5 rows mix anchors and branches at different timesteps, as in training.
    rollouts = sample_rollouts(
        adapter,
        pipe.transformer,
        schedule,
        plan,
        adapter.encode_prompts(prompts),
        noise,
        num_generations=2,
        noise_level=0.7,
        generator=torch.Generator().manual_seed(1),
        batch_size=5,
    )

    latents = pipeline_images(pipe, adapter, prompts, noise, num_steps, "latent")
    torch.testing.assert_close(schedule.sigmas, pipe.scheduler.sigmas.float(), rtol=0, atol=0)
    # Flux2Pipeline returns its token latents; Flux2KleinPipeline the VAE's (de-normalized, un-patchified) ones.
    anchor = (
        pipe._pack_latents(rollouts.anchor_latents)
        if variant == "dev"
        else adapter.vae_latents(rollouts.anchor_latents)
    )
    torch.testing.assert_close(anchor, latents, rtol=0, atol=1e-5)
    images = pipeline_images(pipe, adapter, prompts, noise, num_steps, "pt")
    torch.testing.assert_close(rollouts.anchor_images, images, rtol=0, atol=1e-5)
    # The comparison can fail: the branches left the anchor, and the guidance (or its absence) changes the sample.
    assert (rollouts.images - rollouts.anchor_images[rollouts.group_prompt][:, None]).abs().max() > 1e-3
    other = get_adapter(
        pipe, height=SIZE, width=SIZE, guidance_scale=guidance_scale + 1.5, max_sequence_length=SEQUENCE_LENGTH[variant]
    )
    changed = (pipeline_images(pipe, other, prompts, noise, num_steps, "pt") - images).abs().max()
    assert (changed > 1e-3) == (variant != "klein-distilled")  # distilled [klein] ignores the scale


def test_schedule_shift_depends_on_the_number_of_steps():
    # FLUX.2's mu grows as the step count falls (compute_empirical_mu); the schedule must follow the pipeline's.
    pipe = build_tiny_flux2_pipeline()
    adapter = get_adapter(pipe, height=SIZE, width=SIZE, max_sequence_length=SEQUENCE_LENGTH["dev"])
    for num_steps in (4, 28):
        schedule = adapter.schedule(num_steps, shift=None)
        pipeline_images(
            pipe, adapter, PROMPTS[:1], adapter.initial_noise(1, torch.Generator().manual_seed(0)), num_steps, "latent"
        )
        torch.testing.assert_close(schedule.sigmas, pipe.scheduler.sigmas.float(), rtol=0, atol=0)
    base = np.linspace(1.0, 0.25, 4)
    static = adapter.schedule(4, shift=3.0).sigmas[:-1].double().numpy()
    torch.testing.assert_close(static, 3 * base / (1 + 2 * base), rtol=0, atol=1e-6)  # a static shift replaces it


@pytest.mark.parametrize("variant, guidance_scale", [("dev", 4.0), ("klein", 4.0)])
def test_on_policy_ratios_are_one(tmp_path, variant, guidance_scale):
    # Training micro-batches (3 groups) differ from sampling batches (7 rows): ratios must still be 1.
    trainer = flux2_trainer(
        tmp_path, variant, guidance_scale=guidance_scale, rollout_batch_size=7, per_device_train_batch_size=3
    )
    single_blocks = trainer.adapter.transformer.single_transformer_blocks
    assert all(hasattr(block.attn.to_out, "lora_A") for block in single_blocks)  # per-block LoRA targets matched
    metrics = trainer.step()
    assert metrics["ratio/on_policy_max_abs_dev"] < 1e-5
    assert metrics["transformer_evaluations"] == 2 * trainer.evaluations_per_prompt()
    assert metrics["grad_norm"] > 0


def test_training_raises_the_reward(tmp_path):
    assert_training_raises_the_reward(flux2_trainer(tmp_path, max_steps=20, prompts_per_device=4), EVAL_PROMPTS)


@pytest.mark.parametrize("variant, negative_prompt", [("dev", ""), ("klein", NEGATIVE)])
def test_saved_lora_loads_into_a_fresh_pipeline(tmp_path, variant, negative_prompt):
    # lora_alpha != r: the loaded LoRA must keep its scale; [klein] with guidance: the CFG pair uses the LoRA too.
    trainer = flux2_trainer(
        tmp_path, variant, negative_prompt=negative_prompt, lora_alpha=16, max_steps=2, learning_rate=5e-2
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    assert os.path.isfile(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    prompts = EVAL_PROMPTS[:2]
    trained = trainer.sample_images(prompts, seed=5)  # prompt i starts from seed 5 + i
    noise = torch.cat(
        [trainer.adapter.initial_noise(1, torch.Generator().manual_seed(5 + i)) for i in range(len(prompts))]
    )

    fresh = BUILDERS[variant](seed=0)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(
        pipeline_images(fresh, trainer.adapter, prompts, noise, 4, "pt"), trained, rtol=0, atol=1e-5
    )
    base = pipeline_images(BUILDERS[variant](seed=0), trainer.adapter, prompts, noise, 4, "pt")
    assert (trained - base).abs().max() > 1e-3  # the LoRA changed the model, so the comparison can fail


@pytest.mark.parametrize("recipe, variant", [("flux2_dev_lora.yaml", "dev"), ("flux2_klein_base_lora.yaml", "klein")])
def test_recipe_states_the_merge_plan_of_its_schedule(recipe, variant):
    spec = importlib.util.spec_from_file_location("hpd", os.path.join(REPO, "examples", "hpd.py"))
    hpd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hpd)
    path = os.path.join(REPO, "examples", "recipes", recipe)
    _, config = TrlParser((hpd.ScriptArguments, EGRPOConfig)).parse_yaml_file(path)  # unknown keys raise
    with open(path) as handle:
        text = handle.read()
    # The tiny pipeline has FLUX.2's VAE factor, patch size and scheduler, so at the recipe's size its schedule is
    # the one the real model samples with.
    pipe = BUILDERS[variant]()
    adapter = get_adapter(
        pipe,
        height=config.height,
        width=config.width,
        guidance_scale=config.guidance_scale,
        max_sequence_length=config.max_sequence_length,
        negative_prompt=config.negative_prompt,
    )
    assert f"({type(pipe).__name__}" in text and config.optimizer_step == "active_step"
    num_steps = config.num_inference_steps
    plan = plan_merges(
        adapter.schedule(num_steps, config.shift).sigmas,
        config.noise_level,
        config.entropy_threshold,
        config.num_active_steps,
        config.merge_length,
        config.merge_windows,
    )
    assert "# merge plan: " + " ".join(f"({step.start}, {step.length})" for step in plan) + "\n" in text
    evaluations = num_steps + config.num_generations * sum(num_steps - step.end for step in plan)
    assert f"Cost: {evaluations} " in text
    mu = compute_empirical_mu(adapter.num_image_tokens, num_steps)
    assert f"compute_empirical_mu({adapter.num_image_tokens} tokens, {num_steps} steps) = {mu:.4f}" in text
