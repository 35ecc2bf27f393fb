"""Z-Image through the adapter interface, on the tiny offline Z-Image pipeline: the anchor is the pipeline's own sample
(classifier-free guidance with a negative prompt, and without guidance as Z-Image-Turbo samples), the schedule is
the pipeline's to the bit, prompt embeddings do not depend on their batch, on-policy ratios are 1, training raises a
reward, the saved LoRA loads into a plain ``ZImagePipeline``, bad input is a clear error, and the recipe states its
schedule's merge plan."""

import importlib.util
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from trl import TrlParser  # noqa: E402

from helpers import assert_training_raises_the_reward  # noqa: E402
from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer, plan_merges  # noqa: E402
from trl_flow_egrpo.adapters import ZImageAdapter, get_adapter  # noqa: E402
from trl_flow_egrpo.rewards import ColorReward  # noqa: E402
from trl_flow_egrpo.rollout import sample_rollouts  # noqa: E402
from trl_flow_egrpo.schedule import scheduler_schedule  # noqa: E402
from trl_flow_egrpo.tiny import build_tiny_zimage_pipeline  # noqa: E402

PROMPTS = ["a red apple", "a fire truck", "a cat on a mat", "sunset over the sea", "a rose", "a bowl of cherries"]
EVAL_PROMPTS = ["a red apple", "a rose", "a car", "the sea", "a cat", "a bowl of cherries", "fire", "a house"]
NEGATIVE = "blurry, dark"
SIZE, SEQUENCE_LENGTH = 32, 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def zimage_trainer(output_dir, pipeline=None, **overrides) -> EGRPOTrainer:
    """An EGRPOTrainer on the tiny Z-Image pipeline: 32x32, 4 steps (2 trained), 6 rollouts per group, float32,
    no guidance (Z-Image-Turbo's way) unless overridden."""
    values = dict(
        output_dir=str(output_dir),
        height=SIZE,
        width=SIZE,
        max_sequence_length=SEQUENCE_LENGTH,
        num_inference_steps=4,
        num_active_steps=2,
        num_generations=6,
        prompts_per_device=2,
        shift=None,
        guidance_scale=0.0,
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
        pipeline or build_tiny_zimage_pipeline(seed=0),
        [ColorReward()],
        Dataset.from_dict({"prompt": PROMPTS}),
    )


def pipeline_images(pipeline, adapter, prompts, noise, num_steps, output_type):
    """``ZImagePipeline.__call__`` from ``noise`` with the adapter's guidance and negative prompt; the pipeline
    computes its own schedule. It rewrites the prompt list it is given (chat template), so it gets a copy."""
    negative = [adapter.negative_prompt] * len(prompts) if adapter.do_classifier_free_guidance else None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        prompt=list(prompts),
        negative_prompt=negative,
        latents=noise.clone(),
        num_inference_steps=num_steps,
        guidance_scale=adapter.guidance_scale,
        height=adapter.height,
        width=adapter.width,
        max_sequence_length=adapter.max_sequence_length,
        output_type=output_type,
    ).images


@torch.no_grad()
def test_adapter_is_registered_and_draws_the_pipelines_noise():
    pipe = build_tiny_zimage_pipeline()
    adapter = get_adapter(pipe, height=SIZE, width=64)
    assert isinstance(adapter, ZImageAdapter)
    assert adapter.guidance_scale == ZImageAdapter.default_guidance_scale == 5.0  # ZImagePipeline.__call__'s
    assert adapter.do_classifier_free_guidance and adapter.family == "zimage"
    noise = adapter.initial_noise(3, torch.Generator().manual_seed(7))
    assert noise.shape == (3, 16, SIZE // 8, 64 // 8) and noise.dtype == torch.float32
    expected = pipe.prepare_latents(3, 16, SIZE, 64, torch.float32, "cpu", torch.Generator().manual_seed(7))
    torch.testing.assert_close(noise, expected, rtol=0, atol=0)
    assert not get_adapter(pipe, height=SIZE, width=SIZE, guidance_scale=0.0).do_classifier_free_guidance


@pytest.mark.parametrize("num_steps", [4, 6, 9, 28, 50])
def test_schedule_is_the_pipelines_to_the_bit(num_steps):
    # ZImagePipeline's grid is torch.linspace in float32; the float64 numpy grid of the other families differs
    # from it by one ulp at 6, 28 and 50 steps, so the adapter must build its schedule from the pipeline's grid.
    pipe = build_tiny_zimage_pipeline()
    for scheduler in (pipe.scheduler, FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)):
        pipe.scheduler = scheduler
        schedule = get_adapter(pipe, height=SIZE, width=64).schedule(num_steps, shift=None)
        pipeline_images(
            pipe,
            get_adapter(pipe, height=SIZE, width=64, guidance_scale=0.0),
            ["a cat"],
            torch.zeros(1, 16, SIZE // 8, 64 // 8),
            num_steps,
            "latent",
        )
        torch.testing.assert_close(schedule.sigmas, pipe.scheduler.sigmas.float(), rtol=0, atol=0)
        torch.testing.assert_close(schedule.timesteps, pipe.scheduler.timesteps.float(), rtol=0, atol=0)
    static = get_adapter(pipe, height=SIZE, width=SIZE).schedule(num_steps, shift=2.0)
    unshifted = 1 - 1 / num_steps
    assert float(static.sigmas[1]) == pytest.approx(2.0 * unshifted / (1 + unshifted), abs=1e-6)


@torch.no_grad()
def test_prompt_embeddings_do_not_depend_on_the_batch():
    adapter = get_adapter(
        build_tiny_zimage_pipeline(),
        height=SIZE,
        width=SIZE,
        max_sequence_length=SEQUENCE_LENGTH,
        negative_prompt=NEGATIVE,
    )
    prompts = ["a rose", "a bowl of cherries on a wooden table"]
    together = adapter.encode_prompts(prompts)
    assert prompts == ["a rose", "a bowl of cherries on a wooden table"]  # the pipeline rewrites its argument
    alone = adapter.encode_prompts(["a rose"])
    for name, tensor in alone.items():
        assert tensor.shape[1] == SEQUENCE_LENGTH
        torch.testing.assert_close(together[name][:1], tensor, rtol=0, atol=1e-6)
    lengths = together["prompt_embeds_mask"].sum(1).tolist()
    assert lengths[0] < lengths[1] <= SEQUENCE_LENGTH
    assert together["prompt_embeds"][0, lengths[0] :].abs().max() == 0  # padding is zeros, masked out


PARITY_CASES = [
    pytest.param(4.0, NEGATIVE, id="cfg-4-negative"),
    pytest.param(5.0, "", id="cfg-5-empty-negative"),
    pytest.param(0.0, "", id="no-cfg-turbo"),
]


@pytest.mark.parametrize("guidance_scale, negative_prompt", PARITY_CASES)
def test_anchor_trajectory_is_the_pipelines_sample(guidance_scale, negative_prompt):
    pipe = build_tiny_zimage_pipeline()
    adapter = get_adapter(
        pipe,
        height=SIZE,
        width=SIZE,
        guidance_scale=guidance_scale,
        max_sequence_length=SEQUENCE_LENGTH,
        negative_prompt=negative_prompt,
    )
    num_steps = 6
    schedule = adapter.schedule(num_steps, shift=None)  # the pipeline's own: static shift 3
    prompts = ["a red apple", "a fire truck on a bridge at night"]  # different lengths
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
    torch.testing.assert_close(rollouts.anchor_latents, latents, rtol=0, atol=1e-5)
    images = pipeline_images(pipe, adapter, prompts, noise, num_steps, "pt")
    torch.testing.assert_close(rollouts.anchor_images, images, rtol=0, atol=1e-5)
    # The comparison can fail: the branches left the anchor, and the guidance changes the sample.
    assert (rollouts.images - rollouts.anchor_images[rollouts.group_prompt][:, None]).abs().max() > 1e-3
    other = get_adapter(
        pipe,
        height=SIZE,
        width=SIZE,
        guidance_scale=guidance_scale + 2,
        max_sequence_length=SEQUENCE_LENGTH,
        negative_prompt=negative_prompt,
    )
    assert (pipeline_images(pipe, other, prompts, noise, num_steps, "pt") - images).abs().max() > 1e-3


@pytest.mark.parametrize("guidance_scale, negative_prompt", [(0.0, ""), (4.0, NEGATIVE)])
def test_on_policy_ratios_are_one(tmp_path, guidance_scale, negative_prompt):
    # Training micro-batches (3 groups) differ from sampling batches (7 rows), and so do their prompts' lengths.
    trainer = zimage_trainer(
        tmp_path,
        guidance_scale=guidance_scale,
        negative_prompt=negative_prompt,
        rollout_batch_size=7,
        per_device_train_batch_size=3,
    )
    metrics = trainer.step()
    assert metrics["ratio/on_policy_max_abs_dev"] < 1e-5
    assert metrics["transformer_evaluations"] == trainer.config.prompts_per_device * trainer.evaluations_per_prompt()
    assert metrics["grad_norm"] > 0


def test_training_raises_the_reward(tmp_path):
    assert_training_raises_the_reward(zimage_trainer(tmp_path, max_steps=20, prompts_per_device=4), EVAL_PROMPTS)


def test_saved_lora_loads_into_a_fresh_pipeline(tmp_path):
    # lora_alpha != r: the loaded LoRA must keep its scale; guidance on: the CFG pair uses the LoRA too.
    trainer = zimage_trainer(
        tmp_path, guidance_scale=4.0, negative_prompt=NEGATIVE, lora_alpha=16, max_steps=2, learning_rate=5e-2
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    saved = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    # The default targets reach every block kind and the final projection.
    for module in (
        "noise_refiner.0.attention.to_q",
        "context_refiner.0.feed_forward.w2",
        "layers.1.attention.to_out.0",
        "all_final_layer.2-1.linear",
    ):
        assert f"transformer.{module}.lora_A.weight" in saved
    prompts = EVAL_PROMPTS[:2]
    trained = trainer.sample_images(prompts, seed=5)  # prompt i starts from seed 5 + i
    noise = torch.cat(
        [trainer.adapter.initial_noise(1, torch.Generator().manual_seed(5 + i)) for i in range(len(prompts))]
    )

    fresh = build_tiny_zimage_pipeline(seed=0)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(
        pipeline_images(fresh, trainer.adapter, prompts, noise, 4, "pt"), trained, rtol=0, atol=1e-5
    )
    base = pipeline_images(build_tiny_zimage_pipeline(seed=0), trainer.adapter, prompts, noise, 4, "pt")
    assert (trained - base).abs().max() > 1e-3  # the LoRA changed the model, so the comparison can fail


def test_bad_input_is_a_clear_error(tmp_path):
    pipe = build_tiny_zimage_pipeline()
    with pytest.raises(ValueError, match="height=40: ZImage needs image sizes that are positive multiples of 16"):
        get_adapter(pipe, height=40, width=SIZE)
    with pytest.raises(
        ValueError,
        match="negative_prompt='blurry, dark': classifier-free guidance is off .*"
        "Set guidance_scale > 0 to use it .* or negative_prompt to ''",
    ):
        zimage_trainer(tmp_path, pipeline=pipe, guidance_scale=0.0, negative_prompt=NEGATIVE)
    with pytest.raises(
        ValueError,
        match=r"guidance_scale=-1.0: ZImagePipeline's classifier-free guidance scale "
        "must be >= 0",
    ):
        get_adapter(pipe, height=SIZE, width=SIZE, guidance_scale=-1.0)
    pipe.transformer.register_to_config(all_patch_size=(1,))
    with pytest.raises(ValueError, match=r"patch sizes \(1,\); ZImagePipeline samples with 2x2 patches"):
        get_adapter(pipe, height=SIZE, width=SIZE)


def test_recipe_states_the_merge_plan_of_its_schedule():
    spec = importlib.util.spec_from_file_location("hpd", os.path.join(REPO, "examples", "hpd.py"))
    hpd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hpd)
    path = os.path.join(REPO, "examples", "recipes", "z_image_lora.yaml")
    _, config = TrlParser((hpd.ScriptArguments, EGRPOConfig)).parse_yaml_file(path)  # unknown keys raise
    with open(path) as handle:
        text = handle.read()
    # The tiny pipeline has Z-Image's VAE factor, patch size and released scheduler config (static shift 3), so
    # at the recipe's size its schedule is the one the real model samples with.
    pipe = build_tiny_zimage_pipeline()
    adapter = get_adapter(
        pipe,
        height=config.height,
        width=config.width,
        guidance_scale=config.guidance_scale,
        max_sequence_length=config.max_sequence_length,
        negative_prompt=config.negative_prompt,
    )
    assert config.optimizer_step == "active_step" and adapter.do_classifier_free_guidance
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
    assert f"{adapter.num_image_tokens} image tokens" in text
    last_trained = float(schedule.sigmas[config.num_active_steps])
    assert f"sigma 1 -> {last_trained:.2f}" in text
    torch.testing.assert_close(schedule.sigmas, scheduler_schedule(pipe.scheduler, num_steps).sigmas, rtol=0, atol=1e-6)
