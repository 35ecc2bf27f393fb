"""Stable Diffusion 3 through the adapter interface, on the tiny offline SD3 pipeline: the anchor is the
pipeline's own sample (with and without classifier-free guidance), on-policy ratios are 1, training raises
a reward, and the saved LoRA loads into a plain ``StableDiffusion3Pipeline``."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from helpers import assert_training_raises_the_reward  # noqa: E402
from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer, plan_merges  # noqa: E402
from trl_flow_egrpo.adapters import SD3Adapter, get_adapter  # noqa: E402
from trl_flow_egrpo.rewards import ColorReward  # noqa: E402
from trl_flow_egrpo.rollout import sample_rollouts  # noqa: E402
from trl_flow_egrpo.tiny import build_tiny_sd3_pipeline  # noqa: E402

PROMPTS = ["a red apple", "a fire truck", "a cat on a mat", "sunset over the sea", "a rose", "a bowl of cherries"]
EVAL_PROMPTS = ["a red apple", "a rose", "a car", "the sea", "a cat", "a bowl of cherries", "fire", "a house"]
NEGATIVE = "blurry, dark"
SIZE, SEQUENCE_LENGTH = 64, 32
GUIDANCE = [pytest.param(1.0, id="no-cfg"), pytest.param(4.5, id="cfg-4.5")]


def pipeline_sigmas(num_steps: int) -> np.ndarray:
    """The unshifted sigmas the adapter's schedule starts from; given to the pipeline so both sample alike."""
    return np.linspace(1.0, 1.0 / num_steps, num_steps)


def sd3_trainer(output_dir, pipeline=None, **overrides) -> EGRPOTrainer:
    """An EGRPOTrainer on the tiny SD3 pipeline: 64x64, 4 steps (2 trained), 6 rollouts per group, float32."""
    values = dict(
        output_dir=str(output_dir),
        height=SIZE,
        width=SIZE,
        max_sequence_length=SEQUENCE_LENGTH,
        num_inference_steps=4,
        num_active_steps=2,
        num_generations=6,
        prompts_per_device=2,
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
    if values["guidance_scale"] > 1:  # the negative prompt is used only with classifier-free guidance
        values.setdefault("negative_prompt", NEGATIVE)
    return EGRPOTrainer(
        EGRPOConfig(**values),
        pipeline or build_tiny_sd3_pipeline(seed=0),
        [ColorReward()],
        Dataset.from_dict({"prompt": PROMPTS}),
    )


@torch.no_grad()
def test_adapter_is_registered_and_draws_the_pipelines_noise():
    pipe = build_tiny_sd3_pipeline()
    adapter = get_adapter(pipe, height=SIZE, width=SIZE)
    assert isinstance(adapter, SD3Adapter)
    assert adapter.guidance_scale == SD3Adapter.default_guidance_scale == 4.5
    noise = adapter.initial_noise(3, torch.Generator().manual_seed(7))
    assert noise.shape == (3, 16, SIZE // 8, SIZE // 8) and noise.dtype == torch.float32
    expected = pipe.prepare_latents(3, 16, SIZE, SIZE, torch.float32, "cpu", torch.Generator().manual_seed(7))
    torch.testing.assert_close(noise, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="positive multiples of 16"):
        get_adapter(pipe, height=72, width=64)


def test_dynamic_shift_schedule_is_the_pipelines():
    # SD3 checkpoints ship static-shift schedulers; one with dynamic shifting must get the pipeline's mu.
    pipe = build_tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64
    )
    adapter = get_adapter(pipe, height=SIZE, width=SIZE, guidance_scale=1.0, max_sequence_length=SEQUENCE_LENGTH)
    schedule = adapter.schedule(4, shift=None)
    pipe(
        "a cat",
        num_inference_steps=4,
        sigmas=pipeline_sigmas(4),
        height=SIZE,
        width=SIZE,
        guidance_scale=1.0,
        max_sequence_length=SEQUENCE_LENGTH,
        output_type="latent",
    )
    torch.testing.assert_close(schedule.sigmas, pipe.scheduler.sigmas.float(), rtol=0, atol=1e-7)
    assert not torch.allclose(schedule.sigmas, adapter.schedule(4, shift=3.0).sigmas)  # mu mattered


@pytest.mark.parametrize("guidance_scale", GUIDANCE)
def test_anchor_trajectory_is_the_pipelines_sample(guidance_scale):
    pipe = build_tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    adapter = get_adapter(
        pipe,
        height=SIZE,
        width=SIZE,
        guidance_scale=guidance_scale,
        max_sequence_length=SEQUENCE_LENGTH,
        negative_prompt=NEGATIVE,
    )
    num_steps = 6
    schedule = adapter.schedule(num_steps, shift=None)  # the tiny scheduler's own static shift 3 ...
    torch.testing.assert_close(schedule.sigmas, adapter.schedule(num_steps, shift=3.0).sigmas, rtol=0, atol=0)
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

    def pipeline_sample(output_type):
        return pipe(
            prompts,
            negative_prompt=[NEGATIVE] * len(prompts),
            num_inference_steps=num_steps,
            sigmas=pipeline_sigmas(num_steps),
            guidance_scale=guidance_scale,
            height=SIZE,
            width=SIZE,
            latents=noise.clone(),
            max_sequence_length=SEQUENCE_LENGTH,
            output_type=output_type,
        ).images

    torch.testing.assert_close(rollouts.anchor_latents, pipeline_sample("latent"), rtol=0, atol=1e-5)
    torch.testing.assert_close(rollouts.anchor_images, pipeline_sample("pt"), rtol=0, atol=1e-5)
    # The branches left the anchor: the comparison above is not trivially met by any trajectory.
    assert (rollouts.images - rollouts.anchor_images[rollouts.group_prompt][:, None]).abs().max() > 1e-3


@pytest.mark.parametrize("guidance_scale", GUIDANCE)
def test_on_policy_ratios_are_one(tmp_path, guidance_scale):
    # Training micro-batches (3 groups) differ from sampling batches (7 rows): ratios must still be 1.
    trainer = sd3_trainer(tmp_path, guidance_scale=guidance_scale, rollout_batch_size=7, per_device_train_batch_size=3)
    metrics = trainer.step()
    assert metrics["ratio/on_policy_max_abs_dev"] < 1e-5
    assert metrics["transformer_evaluations"] == 2 * trainer.evaluations_per_prompt()
    assert metrics["grad_norm"] > 0  # the LoRA gets a gradient through the (guided) velocity


def test_training_raises_the_reward(tmp_path):
    # 4 prompts per iteration: with 2, the gain after 20 iterations depends on the seed (some seeds lose).
    assert_training_raises_the_reward(sd3_trainer(tmp_path, max_steps=20, prompts_per_device=4), EVAL_PROMPTS)


def test_saved_lora_loads_into_a_fresh_pipeline(tmp_path):
    # lora_alpha != r: the loaded LoRA must keep its scale; guidance on: the CFG pair uses the LoRA too.
    trainer = sd3_trainer(tmp_path, guidance_scale=4.5, lora_alpha=16, max_steps=2, learning_rate=5e-2)
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    assert os.path.isfile(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    prompts = EVAL_PROMPTS[:2]
    trained = trainer.sample_images(prompts, seed=5)  # prompt i starts from seed 5 + i

    def pipeline_images(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            prompts,
            negative_prompt=[NEGATIVE] * len(prompts),
            num_inference_steps=4,
            sigmas=pipeline_sigmas(4),
            guidance_scale=4.5,
            height=SIZE,
            width=SIZE,
            latents=torch.cat(
                [trainer.adapter.initial_noise(1, torch.Generator().manual_seed(5 + i)) for i in range(len(prompts))]
            ),
            max_sequence_length=SEQUENCE_LENGTH,
            output_type="pt",
        ).images

    fresh = build_tiny_sd3_pipeline(seed=0)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(pipeline_images(fresh), trained, rtol=0, atol=1e-5)
    base = pipeline_images(build_tiny_sd3_pipeline(seed=0))
    assert (trained - base).abs().max() > 1e-3  # the LoRA changed the model, so the comparison can fail
