"""The GRPO family behind EGRPOConfig.algorithm: Flow-GRPO, DanceGRPO and MixGRPO next to E-GRPO."""

import pytest
import torch

from helpers import PROMPTS, assert_reward_rose, tiny_trainer
from trl_flow_egrpo.algorithms import ALGORITHMS, DanceGRPO, FlowGRPO, MixGRPO
from trl_flow_egrpo.rewards import ColorReward
from trl_flow_egrpo.rollout import sample_ode, sample_trajectories
from trl_flow_egrpo.sde import constant_noise_sde_mean_std, sde_mean_std

BASELINES = ["flow-grpo", "dance-grpo", "mix-grpo"]
STEPS, G = 8, 4  # tiny_config: 8 sampling steps, 4 rollouts per group, 2 prompts per iteration


def _trainer(tmp_path, algorithm, **overrides):
    values = dict(algorithm=algorithm, max_steps=1, mix_window_size=3, mix_shift_interval=2)
    values.update(overrides)
    return tiny_trainer(tmp_path, **values)


@pytest.mark.parametrize("algorithm", BASELINES)
def test_on_policy_ratio_is_one_and_evaluations_are_exact(tmp_path, algorithm):
    trainer = _trainer(tmp_path, algorithm, rollout_batch_size=5, per_device_train_batch_size=3)
    # G trajectories of T steps per prompt; MixGRPO's first window starts at step 0: no shared ODE prefix yet.
    expected_per_prompt = G * STEPS
    assert trainer.evaluations_per_prompt() == expected_per_prompt
    metrics = trainer.step()
    assert metrics["ratio/on_policy_max_abs_dev"] < 1e-5
    assert metrics["transformer_evaluations"] == 2 * expected_per_prompt


def test_trained_steps_and_phases_follow_each_paper(tmp_path):
    flow, dance, mix = (_trainer(tmp_path / name, name).strategy for name in BASELINES)
    assert isinstance(flow, FlowGRPO) and isinstance(dance, DanceGRPO) and isinstance(mix, MixGRPO)
    generator = torch.Generator().manual_seed(0)
    # Flow-GRPO: the first int(0.99 T) steps of every trajectory; DanceGRPO: int(0.6 T) random ones per trajectory.
    assert flow.trained_steps(0, generator).tolist() == [[True] * 7 + [False]] * G and flow.num_phases == 7
    dance_steps = dance.trained_steps(0, generator)
    assert (dance_steps.sum(1) == 4).all() and dance.num_phases == 4
    assert len({tuple(row) for row in dance_steps.tolist()}) > 1  # drawn per trajectory
    # MixGRPO: a 3-step window moving one step every 2 iterations, back to 0 after the end (6 positions).
    assert [mix.window_start(i) for i in range(0, 14, 2)] == [0, 1, 2, 3, 4, 5, 0]
    assert mix.stochastic_steps(4).tolist() == [False, False, True, True, True, False, False, False]
    assert mix.evaluations_per_prompt(4) == 2 + G * (STEPS - 2)  # the ODE prefix is shared by the group


def test_mix_grpo_shares_the_prefix_and_trains_only_the_window(tmp_path):
    trainer = _trainer(tmp_path, "mix-grpo", mix_shift_interval=1)
    trainer.state.iteration = 3  # window [3, 6)
    rollouts = trainer.generate(PROMPTS[:2])
    assert sorted(set(rollouts.step_start.tolist())) == [3, 4, 5]
    assert rollouts.num_evaluations == 2 * (3 + G * (STEPS - 3))
    first = rollouts.step_start == 3
    latents = rollouts.step_latents[first].view(2, G, -1)  # one prompt per row, members in order
    assert torch.equal(latents, latents[:, :1].expand_as(latents))  # same noise, same ODE prefix


def test_dance_grpo_starts_a_group_from_one_noise_and_flow_grpo_from_g(tmp_path):
    for algorithm, shared in (("dance-grpo", True), ("flow-grpo", False)):
        rollouts = _trainer(tmp_path / algorithm, algorithm, timestep_fraction=1.0).generate(PROMPTS[:1])
        starts = rollouts.step_latents[rollouts.step_start == 0].flatten(1)
        assert torch.equal(starts, starts[:1].expand_as(starts)) == shared, algorithm


def test_trajectory_engine_without_sde_is_the_ode_sampler(tmp_path):
    trainer = _trainer(tmp_path, "flow-grpo")
    adapter, schedule = trainer.adapter, trainer.schedule
    conditioning = adapter.encode_prompts(PROMPTS[:2])
    noise = adapter.initial_noise(2, torch.Generator().manual_seed(3))
    prompts = torch.arange(2)
    final, steps, evaluations, _ = sample_trajectories(
        adapter,
        adapter.transformer,
        schedule,
        conditioning,
        noise,
        prompts,
        trainer.strategy.step_distribution,
        torch.zeros(STEPS, dtype=torch.bool),
        torch.zeros(2, STEPS, dtype=torch.bool),
        torch.Generator(),
        3,
    )
    assert steps == [] and evaluations == 2 * STEPS
    torch.testing.assert_close(
        final, sample_ode(adapter, adapter.transformer, schedule, conditioning, noise, 7), rtol=0, atol=0
    )


def test_dance_sde_is_flow_grpo_sde_with_a_constant_coefficient():
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    latents, velocity = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    index = torch.tensor([1, 2, 3])
    mean, std = constant_noise_sde_mean_std(latents, velocity, sigmas, index, eta=0.3)
    # Flow-GRPO's coefficient is a * sqrt(s / (1 - s)); choosing a so that it equals 0.3 gives the same step.
    s = sigmas[index]
    a = 0.3 / torch.sqrt(s / (1 - s))
    for i in range(3):
        flow_mean, flow_std = sde_mean_std(
            latents[i : i + 1], velocity[i : i + 1], sigmas, int(index[i]), 1, float(a[i])
        )
        torch.testing.assert_close(mean[i : i + 1], flow_mean)
        torch.testing.assert_close(std[i : i + 1], flow_std)
    torch.testing.assert_close(std, 0.3 * torch.sqrt(s - sigmas[index + 1]))


# End to end (slow): on the random-weight tiny model the baselines' gains are small enough that the tiny text
# encoders' initialization, which changed in transformers 5.13, decides them; the minimum-versions CI run skips it.
@pytest.mark.slow
@pytest.mark.parametrize("algorithm", BASELINES)
def test_baselines_raise_the_reward(tmp_path, algorithm):
    reward = ColorReward()
    prompts = [f"{thing} number {i}" for i in range(4) for thing in ("a red apple", "a rose", "the sea", "a house")]
    trainer = _trainer(
        tmp_path, algorithm, max_steps=12, num_generations=6, mix_shift_interval=3, learning_rate=3e-2, clip_range=3e-2
    )
    before = reward(trainer.sample_images(prompts, seed=123), prompts)
    trainer.train()
    after = reward(trainer.sample_images(prompts, seed=123), prompts)
    assert_reward_rose(before, after, min_gain=0.002)


def test_dance_grpo_resumes_exactly(tmp_path):
    keys = ["loss", "reward/weighted_mean", "grad_norm"]
    uninterrupted = _trainer(tmp_path / "a", "dance-grpo", max_steps=3, save_steps=1).train().log_history
    resumed = (
        _trainer(tmp_path / "b", "dance-grpo", max_steps=3, resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
        .train()
        .log_history
    )
    for key in keys:
        assert [row[key] for row in resumed[1:]] == [row[key] for row in uninterrupted[1:]], key


def test_every_algorithm_is_registered_and_bad_names_are_refused(tmp_path):
    assert sorted(ALGORITHMS) == sorted(["e-grpo", *BASELINES])
    with pytest.raises(ValueError, match="algorithm='ppo' is not allowed"):
        _trainer(tmp_path, "ppo")
