"""Qwen-Image through the adapter interface, on the tiny offline Qwen-Image pipeline: the anchor is the pipeline's own
sample (true classifier-free guidance with its norm rescale, and without guidance), prompt embeddings do not
depend on their batch, on-policy ratios are 1, training raises a reward, the saved LoRA loads into a plain
``QwenImagePipeline``, bad input is a clear error, and the recipe states its schedule's merge plan."""

import importlib.util
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import TrlParser  # noqa: E402

from helpers import assert_training_raises_the_reward  # noqa: E402
from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer, plan_merges  # noqa: E402
from trl_flow_egrpo.adapters import QwenImageAdapter, get_adapter  # noqa: E402
from trl_flow_egrpo.rewards import ColorReward  # noqa: E402
from trl_flow_egrpo.rollout import sample_rollouts  # noqa: E402
from trl_flow_egrpo.schedule import dynamic_shift_mu  # noqa: E402
from trl_flow_egrpo.tiny import build_tiny_qwenimage_pipeline  # noqa: E402

PROMPTS = ["a red apple", "a fire truck", "a cat on a mat", "sunset over the sea", "a rose", "a bowl of cherries"]
EVAL_PROMPTS = ["a red apple", "a rose", "a car", "the sea", "a cat", "a bowl of cherries", "fire", "a house"]
NEGATIVE = "blurry, dark"
SIZE, SEQUENCE_LENGTH = 32, 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def qwenimage_trainer(output_dir, pipeline=None, **overrides) -> EGRPOTrainer:
    """An EGRPOTrainer on the tiny Qwen-Image pipeline: 32x32, 4 steps (2 trained), 6 rollouts per group, float32."""
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
        guidance_scale=1.0,
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
        pipeline or build_tiny_qwenimage_pipeline(seed=0),
        [ColorReward()],
        Dataset.from_dict({"prompt": PROMPTS}),
    )


def pipeline_images(pipeline, adapter, prompts, noise, num_steps, output_type):
    """``QwenImagePipeline.__call__`` from ``noise`` with the adapter's guidance (``true_cfg_scale``) and negative
    prompt; the pipeline computes its own schedule (``linspace(1, 1/T, T)``, its own mu and terminal stretch)."""
    negative = (
        {"negative_prompt": [adapter.negative_prompt] * len(prompts)} if adapter.do_classifier_free_guidance else {}
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        prompt=prompts,
        latents=noise.clone(),
        num_inference_steps=num_steps,
        true_cfg_scale=adapter.guidance_scale,
        height=adapter.height,
        width=adapter.width,
        max_sequence_length=adapter.max_sequence_length,
        output_type=output_type,
        **negative,
    ).images


@torch.no_grad()
def test_adapter_is_registered_and_draws_the_pipelines_noise():
    pipe = build_tiny_qwenimage_pipeline()
    adapter = get_adapter(pipe, height=SIZE, width=64)
    assert isinstance(adapter, QwenImageAdapter)
    assert adapter.guidance_scale == QwenImageAdapter.default_guidance_scale == 4.0
    noise = adapter.initial_noise(3, torch.Generator().manual_seed(7))
    assert noise.shape == (3, (SIZE // 16) * (64 // 16), 64) and noise.dtype == torch.float32
    expected = pipe.prepare_latents(3, 16, SIZE, 64, torch.float32, "cpu", torch.Generator().manual_seed(7))
    torch.testing.assert_close(noise, expected, rtol=0, atol=0)
    # The tiny tokenizer splits the prompt template like the real one: the pipeline drops exactly the template.
    ids = pipe.tokenizer(pipe.prompt_template_encode.format("a cat"))["input_ids"]
    dropped = pipe.tokenizer.decode(ids[: pipe.prompt_template_encode_start_idx])
    assert dropped == pipe.prompt_template_encode.split("{}")[0]


def test_bad_input_is_a_clear_error(tmp_path):
    pipe = build_tiny_qwenimage_pipeline()
    with pytest.raises(ValueError, match="height=40: QwenImage needs image sizes that are positive multiples of 16"):
        get_adapter(pipe, height=40, width=SIZE)
    with pytest.raises(
        ValueError,
        match="negative_prompt='blurry, dark': classifier-free guidance is off .*"
        "Set guidance_scale > 1 to use it, or negative_prompt to ''",
    ):
        qwenimage_trainer(tmp_path, pipeline=pipe, guidance_scale=1.0, negative_prompt=NEGATIVE)
    pipe.transformer.register_to_config(guidance_embeds=True)
    with pytest.raises(ValueError, match="guidance_embeds=True .* true classifier-free guidance only"):
        get_adapter(pipe, height=SIZE, width=SIZE)


@torch.no_grad()
def test_prompt_embeddings_do_not_depend_on_the_batch():
    # The pipeline pads to the batch's longest prompt; the adapter's rows must not change with their company.
    adapter = get_adapter(
        build_tiny_qwenimage_pipeline(),
        height=SIZE,
        width=SIZE,
        max_sequence_length=SEQUENCE_LENGTH,
        negative_prompt=NEGATIVE,
    )
    alone = adapter.encode_prompts(["a rose"])
    together = adapter.encode_prompts(["a rose", "a bowl of cherries on a wooden table"])
    for name, tensor in alone.items():
        assert tensor.shape[1] == SEQUENCE_LENGTH
        torch.testing.assert_close(together[name][:1], tensor, rtol=0, atol=1e-6)
    assert together["prompt_embeds_mask"].sum(1).tolist()[0] < together["prompt_embeds_mask"].sum(1).tolist()[1]


PARITY_CASES = [
    pytest.param(4.0, " ", id="cfg-4-model-card-negative"),
    pytest.param(3.0, NEGATIVE, id="cfg-3-negative"),
    pytest.param(1.0, "", id="no-cfg"),
]


@pytest.mark.parametrize("guidance_scale, negative_prompt", PARITY_CASES)
def test_anchor_trajectory_is_the_pipelines_sample(guidance_scale, negative_prompt):
    pipe = build_tiny_qwenimage_pipeline()
    adapter = get_adapter(
        pipe,
        height=SIZE,
        width=SIZE,
        guidance_scale=guidance_scale,
        max_sequence_length=SEQUENCE_LENGTH,
        negative_prompt=negative_prompt,
    )
    num_steps = 6
    schedule = adapter.schedule(num_steps, shift=None)  # the pipeline's own: dynamic shift, terminal stretch
    prompts = ["a red apple", "a fire truck on a bridge at night"]  # different lengths: padding is masked
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
    assert abs(float(schedule.sigmas[-2]) - 0.02) < 1e-6  # shift_terminal, applied by the scheduler
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


@pytest.mark.parametrize("guidance_scale, negative_prompt", [(1.0, ""), (4.0, NEGATIVE)])
def test_on_policy_ratios_are_one(tmp_path, guidance_scale, negative_prompt):
    # Training micro-batches (3 groups) differ from sampling batches (7 rows), and so do their longest prompts.
    trainer = qwenimage_trainer(
        tmp_path,
        guidance_scale=guidance_scale,
        negative_prompt=negative_prompt,
        rollout_batch_size=7,
        per_device_train_batch_size=3,
    )
    metrics = trainer.step()
    assert metrics["ratio/on_policy_max_abs_dev"] < 1e-5
    assert metrics["transformer_evaluations"] == 2 * trainer.evaluations_per_prompt()
    assert metrics["grad_norm"] > 0


def test_training_raises_the_reward(tmp_path):
    assert_training_raises_the_reward(qwenimage_trainer(tmp_path, max_steps=20, prompts_per_device=4), EVAL_PROMPTS)


def test_saved_lora_loads_into_a_fresh_pipeline(tmp_path):
    # lora_alpha != r: the loaded LoRA must keep its scale; guidance on: the CFG pair uses the LoRA too.
    trainer = qwenimage_trainer(
        tmp_path, guidance_scale=4.0, negative_prompt=NEGATIVE, lora_alpha=16, max_steps=2, learning_rate=5e-2
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    assert os.path.isfile(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    prompts = EVAL_PROMPTS[:2]
    trained = trainer.sample_images(prompts, seed=5)  # prompt i starts from seed 5 + i
    noise = torch.cat(
        [trainer.adapter.initial_noise(1, torch.Generator().manual_seed(5 + i)) for i in range(len(prompts))]
    )

    fresh = build_tiny_qwenimage_pipeline(seed=0)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(
        pipeline_images(fresh, trainer.adapter, prompts, noise, 4, "pt"), trained, rtol=0, atol=1e-5
    )
    base = pipeline_images(build_tiny_qwenimage_pipeline(seed=0), trainer.adapter, prompts, noise, 4, "pt")
    assert (trained - base).abs().max() > 1e-3  # the LoRA changed the model, so the comparison can fail


def test_recipe_states_the_merge_plan_of_its_schedule():
    spec = importlib.util.spec_from_file_location("hpd", os.path.join(REPO, "examples", "hpd.py"))
    hpd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hpd)
    path = os.path.join(REPO, "examples", "recipes", "qwen_image_lora.yaml")
    _, config = TrlParser((hpd.ScriptArguments, EGRPOConfig)).parse_yaml_file(path)  # unknown keys raise
    with open(path) as handle:
        text = handle.read()
    # The tiny pipeline has Qwen-Image's VAE factor, patch size and scheduler config, so at the recipe's size its
    # schedule is the one the real model samples with.
    pipe = build_tiny_qwenimage_pipeline()
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
    scheduler = pipe.scheduler.config
    mu = dynamic_shift_mu(
        adapter.num_image_tokens,
        scheduler.base_image_seq_len,
        scheduler.max_image_seq_len,
        scheduler.base_shift,
        scheduler.max_shift,
    )
    assert f"mu = {mu:.4f} for {adapter.num_image_tokens} image tokens" in text
