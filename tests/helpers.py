"""Shared builders for the tests: a tiny E-GRPO setup that trains on a CPU in seconds."""

import math

import torch
from datasets import Dataset
from diffusers import FlowMatchEulerDiscreteScheduler

from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer
from trl_flow_egrpo.rewards import ColorReward
from trl_flow_egrpo.tiny import build_tiny_flux_pipeline

PROMPTS = ["a red apple", "a fire truck", "a cat on a mat", "sunset over the sea", "a rose", "a bowl of cherries"]


def tiny_config(output_dir, **overrides) -> EGRPOConfig:
    """A config for the tiny FLUX pipeline: 64x64 images, 8 steps (4 trained), 4 rollouts per group, float32."""
    values = dict(
        output_dir=str(output_dir),
        height=64,
        width=64,
        max_sequence_length=32,
        num_generations=4,
        num_inference_steps=8,
        num_active_steps=4,
        prompts_per_device=2,
        max_steps=2,
        mixed_precision="no",
        learning_rate=1e-2,
        clip_range=1e-2,
        lora_r=8,
        lora_alpha=16,
        rollout_batch_size=32,
        per_device_train_batch_size=4,
        save_steps=0,
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return EGRPOConfig(**values)


def tiny_trainer(
    output_dir, reward_fns=None, dataset=None, pipeline=None, eval_dataset=None, eval_reward_fns=None, **overrides
) -> EGRPOTrainer:
    """An EGRPOTrainer on the tiny FLUX pipeline (seeded weights) with the colour reward by default."""
    return EGRPOTrainer(
        tiny_config(output_dir, **overrides),
        build_tiny_flux_pipeline(seed=0) if pipeline is None else pipeline,
        [ColorReward()] if reward_fns is None else reward_fns,
        Dataset.from_dict({"prompt": PROMPTS}) if dataset is None else dataset,
        eval_dataset=eval_dataset,
        eval_reward_fns=eval_reward_fns,
    )


def assert_reward_rose(before, after, min_gain: float) -> None:
    """Paired before/after rewards (same prompts, same noise, deterministic sampling): the mean gain must
    exceed ``min_gain`` and 4 standard errors of the per-image gains, i.e. be clearly beyond noise."""
    gain = after - before
    standard_error = gain.std() / len(gain) ** 0.5
    assert gain.mean() > min_gain, f"reward did not rise: {before.mean():.4f} -> {after.mean():.4f}"
    assert gain.mean() > 4 * standard_error, f"gain {gain.mean():.4f} within noise (s.e. {standard_error:.4f})"


def assert_training_raises_the_colour_reward(trainer, min_gain: float) -> None:
    """Train ``trainer`` and assert (:func:`assert_reward_rose`) that ColorReward of its deterministic samples of 16
    prompts (4 subjects x 4 numbers, the same noise before and after) rose by more than ``min_gain``."""
    reward = ColorReward()
    prompts = [f"{thing} number {i}" for i in range(4) for thing in ("a red apple", "a rose", "the sea", "a house")]
    before = reward(trainer.sample_images(prompts, seed=123), prompts)
    trainer.train()
    after = reward(trainer.sample_images(prompts, seed=123), prompts)
    assert_reward_rose(before, after, min_gain)


def count_velocity_rows(adapter):
    """Wrap ``adapter.velocity`` to count the transformer rows it runs; returns the running count (a list)."""
    rows, velocity = [0], adapter.velocity

    def counted(model, latents, *args, **kwargs):
        rows[0] += latents.shape[0]
        return velocity(model, latents, *args, **kwargs)

    adapter.velocity = counted
    return rows


def record_optimizer_steps(trainer) -> list[float]:
    """Make ``trainer``'s optimizer append, at each of its steps, the learning rate that step uses; returns the
    list (its length is the number of optimizer steps taken)."""
    learning_rates = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        learning_rates.append(trainer.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return learning_rates


def record_calls(obj, method_name: str) -> list[tuple]:
    """Make ``obj.<method_name>`` append ``(args, result)`` for every call; returns the list."""
    calls = []
    method = getattr(obj, method_name)

    def recording_method(*args, **kwargs):
        result = method(*args, **kwargs)
        calls.append((args, result))
        return result

    setattr(obj, method_name, recording_method)
    return calls


def plain_pipeline_images(pipeline, trainer, prompts: list[str], seed: int) -> torch.Tensor:
    """Images of a plain ``FluxPipeline.__call__`` on ``pipeline``, driven as ``trainer.sample_images(prompts,
    seed)`` samples: the trainer's steps, static shift and guidance, prompt ``i`` from a generator seeded
    ``seed + i``. A static shift replaces ``pipeline.scheduler``. Asserts that the pipeline really sampled with
    the trainer's sigmas."""
    config = trainer.config
    pipeline.set_progress_bar_config(disable=True)
    if config.shift is not None:
        pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            pipeline.scheduler.config, shift=config.shift, use_dynamic_shifting=False
        )
    images = pipeline(
        prompts,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=trainer.adapter.guidance_scale,
        height=config.height,
        width=config.width,
        max_sequence_length=config.max_sequence_length,
        output_type="pt",
        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))],
    ).images
    torch.testing.assert_close(pipeline.scheduler.sigmas.float().cpu(), trainer.schedule.sigmas, rtol=0, atol=0)
    return images


def assert_training_raises_the_reward(
    trainer, prompts, min_gain: float = 0.004, seed: int = 123, reward=None, images=None
) -> list[dict]:
    """Train ``trainer`` and require ``reward`` (default: the colour reward) of deterministic samples of ``prompts``
    (the same noise, and for an image-editing family the same source ``images``, before and after) to rise
    (:func:`assert_reward_rose`) with a finite loss every iteration; returns the history."""
    reward = ColorReward() if reward is None else reward
    before = reward(trainer.sample_images(prompts, seed=seed, images=images), prompts)
    history = trainer.train().log_history
    after = reward(trainer.sample_images(prompts, seed=seed, images=images), prompts)
    assert_reward_rose(before, after, min_gain=min_gain)
    assert len(history) == trainer.config.max_steps and all(math.isfinite(m["loss"]) for m in history)
    return history
