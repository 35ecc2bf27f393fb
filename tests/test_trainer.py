"""EGRPOTrainer end to end on the tiny FLUX pipeline: ratios, learning, saving, resuming, bad input."""

import math
import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import FluxPipeline

from helpers import PROMPTS, assert_reward_rose, tiny_config, tiny_trainer
from trl_flow_egrpo import EGRPOTrainer, checkpoints
from trl_flow_egrpo.rewards import BrightnessReward, ColorReward
from trl_flow_egrpo.tiny import build_tiny_flux_pipeline

EVAL_PROMPTS = ["a red apple", "a rose", "a car", "the sea", "a cat", "a bowl of cherries", "fire", "a house"]


def _checkpoint_dirs(path):
    return [name for name in os.listdir(path) if name.startswith("checkpoint")] if os.path.isdir(path) else []


def test_on_policy_ratios_are_one(tmp_path):
    # Training micro-batches (3 groups) differ from sampling batches (7 rows): ratios must still be 1.
    trainer = tiny_trainer(tmp_path, rollout_batch_size=7, per_device_train_batch_size=3, max_steps=1)
    metrics = trainer.step()
    assert metrics["ratio/on_policy_max_abs_dev"] < 1e-5
    assert metrics["transformer_evaluations"] == 2 * trainer.evaluations_per_prompt()
    assert metrics["clip_fraction"] == 0.0


def test_training_raises_the_reward(tmp_path):
    reward = ColorReward()
    trainer = tiny_trainer(tmp_path, max_steps=12, prompts_per_device=2, num_generations=6)
    before = reward(trainer.sample_images(EVAL_PROMPTS, seed=123), EVAL_PROMPTS)
    history = trainer.train().log_history
    after = reward(trainer.sample_images(EVAL_PROMPTS, seed=123), EVAL_PROMPTS)
    assert_reward_rose(before, after, min_gain=0.004)
    assert len(history) == 12 and all(np.isfinite(m["loss"]) for m in history)


def test_lora_save_load_reproduces_the_trained_model(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=3)
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    assert os.path.isfile(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    trained = trainer.sample_images(EVAL_PROMPTS[:3], seed=5)

    fresh = build_tiny_flux_pipeline(seed=0)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    base = tiny_trainer(tmp_path / "base", pipeline=build_tiny_flux_pipeline(seed=0), use_peft=False, max_steps=1)
    base_images = base.sample_images(EVAL_PROMPTS[:3], seed=5)
    loaded = tiny_trainer(tmp_path / "fresh", pipeline=fresh, use_peft=False, max_steps=1)
    loaded_images = loaded.sample_images(EVAL_PROMPTS[:3], seed=5)
    torch.testing.assert_close(loaded_images, trained, rtol=1e-5, atol=1e-5)
    assert (trained - base_images).abs().max() > 1e-3  # the LoRA changed the model, so the test can fail

    # The plain diffusers pipeline loads it too and samples the same images as the trainer.
    pipe_images = fresh(EVAL_PROMPTS[:1], latents=loaded.adapter.initial_noise(1, torch.Generator().manual_seed(5)),
                        num_inference_steps=16, height=64, width=64, max_sequence_length=32, output_type="pt",
                        sigmas=None).images
    assert pipe_images.shape == (1, 3, 64, 64)


def test_full_fine_tuning_saves_the_transformer(tmp_path):
    trainer = tiny_trainer(tmp_path, use_peft=False, learning_rate=1e-4, max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "full"))
    from diffusers import FluxTransformer2DModel

    reloaded = FluxTransformer2DModel.from_pretrained(str(tmp_path / "full" / "transformer"))
    for (name, a), (_, b) in zip(trainer.unwrapped_model.state_dict().items(), reloaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("use_peft", [True, False])
def test_kl_penalty_is_zero_at_the_base_model_and_grows_with_updates(tmp_path, use_peft):
    # One optimizer step per iteration: the first iteration's loss is computed at the base model (a LoRA
    # starts at it, a full fine-tune's frozen reference is a copy of it), later ones after updates.
    trainer = tiny_trainer(tmp_path, beta=0.1, max_steps=3, optimizer_step="iteration", use_peft=use_peft,
                           learning_rate=1e-2 if use_peft else 1e-3)
    kls = [trainer.step()["kl_to_reference"] for _ in range(3)]
    assert kls[0] == pytest.approx(0.0, abs=1e-10)
    assert kls[1] > 1e-8 and kls[2] > 1e-8, kls


def test_resume_continues_exactly(tmp_path):
    keys = ["loss", "ratio/mean", "reward/weighted_mean", "grad_norm", "advantage/std"]
    uninterrupted = tiny_trainer(tmp_path / "a", max_steps=4, save_steps=2)
    history = uninterrupted.train().log_history
    assert checkpoints.list_checkpoints(str(tmp_path / "a")) == [str(tmp_path / "a" / "checkpoint-2"),
                                                                 str(tmp_path / "a" / "checkpoint-4")]
    resumed = tiny_trainer(tmp_path / "b", max_steps=4, resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    resumed_history = resumed.train().log_history
    assert len(resumed_history) == 4
    for expected, actual in zip(history[2:], resumed_history[2:]):
        for key in keys:
            assert actual[key] == expected[key], key
    for a, b in zip(uninterrupted.optimizer.param_groups[0]["params"], resumed.optimizer.param_groups[0]["params"]):
        assert torch.equal(a, b)


def test_interrupted_checkpoint_leaves_the_previous_one_usable(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path, max_steps=4, save_steps=2, save_total_limit=1)
    original_save = torch.save

    def crash_while_saving_iteration_4(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            original_save(obj, path, *args, **kwargs)
            raise KeyboardInterrupt("killed mid-write")
        return original_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crash_while_saving_iteration_4)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.undo()
    assert sorted(_checkpoint_dirs(tmp_path)) == ["checkpoint-2", "checkpoint-4.tmp"]
    assert checkpoints.latest_checkpoint(str(tmp_path)).endswith("checkpoint-2")

    resumed = tiny_trainer(tmp_path, max_steps=4, save_steps=2, save_total_limit=1, resume_from_checkpoint="true")
    assert resumed.state.iteration == 0
    resumed.train()
    assert resumed.state.iteration == 4
    assert sorted(_checkpoint_dirs(tmp_path)) == ["checkpoint-4"]  # stale staging replaced, old pruned


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="holds no checkpoint"):
        tiny_trainer(tmp_path, resume_from_checkpoint="true").train()
    with pytest.raises(ValueError, match="not an E-GRPO checkpoint"):
        tiny_trainer(tmp_path, resume_from_checkpoint=str(tmp_path)).train()


def _wrong_length(images, prompts, **columns):
    return [0.0] * (len(images) - 1)


def _nan(images, prompts, **columns):
    values = torch.zeros(len(images))
    values[3] = float("nan")
    return values


def _inf(images, prompts, **columns):
    return np.full(len(images), np.inf)


@pytest.mark.parametrize("reward, message", [
    (_wrong_length, r"Reward '_wrong_length' returned \(\d+,\) values for \d+ images"),
    (_nan, "Reward '_nan' returned NaN or inf"),
    (_inf, "Reward '_inf' returned NaN or inf"),
    (lambda images, prompts: "good", "not a sequence of numbers"),
    (lambda images, prompts: ["0.5"] * len(images), r"not a sequence of numbers \(e.g. '0.5'\)"),
])
def test_bad_reward_output_is_a_clear_error_and_writes_nothing(tmp_path, reward, message):
    trainer = tiny_trainer(tmp_path, reward_fns=[reward], save_steps=1)
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert _checkpoint_dirs(tmp_path) == []


@pytest.mark.parametrize("dataset, message", [
    (Dataset.from_dict({"prompt": []}), "train_dataset is empty"),
    (Dataset.from_dict({"caption": ["a cat"]}), r"no prompt column 'prompt' \(columns: \['caption'\]\).*prompt_column"),
])
def test_bad_dataset_is_a_clear_error(tmp_path, dataset, message):
    with pytest.raises(ValueError, match=message):
        tiny_trainer(tmp_path, dataset=dataset)
    assert not os.path.exists(tmp_path / "logs")


@pytest.mark.parametrize("overrides, message", [
    (dict(num_generations=1), "num_generations must be >= 2"),
    (dict(num_active_steps=20), r"num_active_steps=20 is not allowed: num_active_steps must be between 1 and "
                                r"num_inference_steps \(8\)"),
    (dict(noise_level=0.0), "noise_level=0.0 is not allowed: noise_level must be a finite number > 0"),
    (dict(merge="often"), "merge must be"),
    (dict(reward_aggregation="max"), "reward_aggregation"),
])
def test_bad_config_is_a_clear_error(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **overrides)


def test_other_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="does not support"):
        EGRPOTrainer(tiny_config(tmp_path), object(), [ColorReward()], Dataset.from_dict({"prompt": PROMPTS}))
    with pytest.raises(ValueError, match="at least one reward"):
        EGRPOTrainer(tiny_config(tmp_path), build_tiny_flux_pipeline(), [], Dataset.from_dict({"prompt": PROMPTS}))
    with pytest.raises(ValueError, match="reward_weights has 1 values for 2 reward functions"):
        tiny_trainer(tmp_path, reward_fns=[ColorReward(), BrightnessReward()], reward_weights=[1.0])


def test_reward_receives_dataset_columns(tmp_path):
    seen = {}

    def reward(images, prompts, style, **columns):
        seen["pairs"] = set(zip(prompts, style))
        return torch.zeros(len(images))

    dataset = Dataset.from_dict({"prompt": ["a", "b", "c"], "style": ["x", "y", "z"]})
    tiny_trainer(tmp_path, reward_fns=[reward], dataset=dataset, max_steps=1).step()
    assert seen["pairs"] <= {("a", "x"), ("b", "y"), ("c", "z")} and len(seen["pairs"]) == 2


def test_optimizer_step_per_active_step(tmp_path):
    trainer = tiny_trainer(tmp_path, optimizer_step="active_step", num_active_steps=3, max_steps=1)
    metrics = trainer.step()
    assert trainer.optimizer_steps_per_iteration == len(trainer.merge_plan) == 3
    assert metrics["ratio/on_policy_max_abs_dev"] < 1e-5
    # After the first optimizer step the policy moved: later groups see ratios != 1.
    assert metrics["ratio/max"] - metrics["ratio/min"] > 0


def test_async_rewards_give_the_same_groups(tmp_path):
    calls = []

    def reward(images, prompts, **columns):
        calls.append(len(images))
        return images.mean(dim=(1, 2, 3))

    trainer = tiny_trainer(tmp_path, reward_fns=[reward], async_rewards=True, prompts_per_device=3, max_steps=1)
    metrics = trainer.step()
    groups_per_prompt = len(trainer.merge_plan)
    # One scoring call per prompt (its G rollouts of every group, plus its anchor).
    assert calls == [groups_per_prompt * 4 + 1] * 3
    assert metrics["transformer_evaluations"] == 3 * trainer.evaluations_per_prompt()
    assert metrics["ratio/on_policy_max_abs_dev"] < 1e-5


@pytest.mark.parametrize("aggregation", ["advantage", "sum"])
def test_two_rewards_log_both_and_raise_the_weighted_objective(tmp_path, aggregation):
    rewards = [ColorReward(), BrightnessReward()]
    weights = [1.0, 0.5]
    trainer = tiny_trainer(tmp_path, reward_fns=rewards, reward_weights=weights, reward_aggregation=aggregation,
                           max_steps=8, num_generations=6)

    def objective():
        images = trainer.sample_images(EVAL_PROMPTS, seed=7)
        return sum(w * r(images, EVAL_PROMPTS) for w, r in zip(weights, rewards))

    before = objective()
    history = trainer.train().log_history
    assert_reward_rose(before, objective(), min_gain=0.0)
    for name in ("color", "brightness"):
        assert all(f"reward/{name}/mean" in m and f"reward/{name}/std" in m for m in history)
    expected = sum(w * history[-1][f"reward/{n}/mean"] for w, n in zip(weights, ["color", "brightness"]))
    assert history[-1]["reward/weighted_mean"] == pytest.approx(expected, rel=1e-5)


def test_missing_tracker_package_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"log_with names 'wandb' but the wandb package is not installed.*\[wandb\]"):
        tiny_trainer(tmp_path, log_with="tensorboard,wandb")


def test_large_on_policy_deviation_is_reported(tmp_path, caplog):
    trainer = tiny_trainer(tmp_path, max_steps=1, clip_range=1e-4)
    generate = trainer.generate

    def mismatched_generate(prompts):
        # Stored log-probs that the training forward cannot reproduce, as with a bf16 sampler and fp32 trainer.
        rollouts = generate(prompts)
        rollouts.log_probs += 1e-3
        return rollouts

    trainer.generate = mismatched_generate
    with caplog.at_level("WARNING", logger="trl_flow_egrpo.trainer"):
        metrics = trainer.step()
    assert metrics["ratio/on_policy_max_abs_dev"] == pytest.approx(1 - math.exp(-1e-3), rel=1e-2)
    assert "On-policy ratios deviate from 1 by up to 1.00e-03" in caplog.text


def test_each_epoch_visits_every_prompt_once(tmp_path):
    trainer = tiny_trainer(tmp_path, prompts_per_device=2)
    epochs = [[row["prompt"] for i in range(3 * e, 3 * e + 3) for row in trainer.iteration_rows(i)] for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(PROMPTS)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert [row["prompt"] for row in trainer.iteration_rows(1)] == epochs[0][2:4]  # a pure function of the iteration


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    plain = tiny_trainer(tmp_path / "plain", max_steps=1).step()
    checkpointed_trainer = tiny_trainer(tmp_path / "ckpt", max_steps=1, gradient_checkpointing=True)
    assert checkpointed_trainer.unwrapped_model.is_gradient_checkpointing
    checkpointed = checkpointed_trainer.step()
    assert checkpointed["loss"] == pytest.approx(plain["loss"], rel=1e-4, abs=1e-9)
    assert checkpointed["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)


def test_bf16_mixed_precision_keeps_sampling_and_training_consistent(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=1, mixed_precision="bf16")
    metrics = trainer.step()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)
    assert trainer.generate(["a cat"]).samples.dtype == torch.float32  # x' stays float32 (METHOD.md section 2)
    assert metrics["ratio/on_policy_max_abs_dev"] < 1e-3 and np.isfinite(metrics["loss"])
