"""E-GRPO's completion options (METHOD.md 4b): the ODE after the branch step, its solver, subset and strides."""

import math

import pytest
import torch

from helpers import record_calls, tiny_trainer
from trl_flow_egrpo import EGRPOConfig, plan_merges
from trl_flow_egrpo.adapters import get_adapter
from trl_flow_egrpo.advantages import group_advantages, sum_advantages_into_targets
from trl_flow_egrpo.rollout import sample_rollouts
from trl_flow_egrpo.schedule import shifted_sigmas
from trl_flow_egrpo.solvers import (
    completion_indices,
    dpmpp_2m_step,
    evenly_spaced_indices,
    integrate_ode,
    strided_completion_indices,
)
from trl_flow_egrpo.tiny import build_tiny_flux_pipeline

STEPS, G = 8, 4  # tiny_config: 8 sampling steps, 4 active steps, 4 rollouts per group, 2 prompts per iteration

# Gaussian data N(DATA_MEAN, DATA_STD^2) per element, noise N(0, 1): the exact flow is linear in x and its ODE has a
# closed-form solution (each x keeps its standardized value (x - (1 - s) DATA_MEAN) / sqrt(variance(s))).
DATA_MEAN, DATA_STD = 0.5, 1.0


def _variance(sigma):
    """Variance of ``x_sigma = (1 - sigma) x0 + sigma * noise`` per element."""
    return (1 - sigma) ** 2 * DATA_STD**2 + sigma**2


def _gaussian_velocity(x, sigma):
    """The exact flow-matching velocity ``E[noise - x0 | x_sigma = x]`` for the Gaussian data."""
    centred = x - (1 - sigma) * DATA_MEAN
    variance = _variance(sigma)
    expected_noise = sigma / variance * centred
    expected_x0 = DATA_MEAN + (1 - sigma) * DATA_STD**2 / variance * centred
    return expected_noise - expected_x0


def _gaussian_ode_solution(x, sigma_from, sigma_to):
    """The exact ODE solution at ``sigma_to`` from ``x`` at ``sigma_from``."""
    standardized = (x - (1 - sigma_from) * DATA_MEAN) / math.sqrt(_variance(sigma_from))
    return (1 - sigma_to) * DATA_MEAN + math.sqrt(_variance(sigma_to)) * standardized


def _solver_error(path, solver, x):
    solution = integrate_ode(_gaussian_velocity, x, path, solver)
    return (solution - _gaussian_ode_solution(x, path[0], path[-1])).abs().max().item()


# ------------------------------------------------------------------ the pure solver module


def test_completion_indices_keep_a_share_of_the_intervals_evenly_spaced_and_end_at_sigma_zero():
    for num_steps in range(1, 21):
        for start in range(num_steps):
            remaining = num_steps - start
            assert completion_indices(num_steps, start, 1.0) == list(range(start, num_steps + 1))
            for fraction in (0.01, 0.2, 0.4, 0.5, 0.75):
                indices = completion_indices(num_steps, start, fraction)
                assert indices[0] == start and indices[-1] == num_steps
                assert all(later > earlier for earlier, later in zip(indices, indices[1:], strict=False))
                assert len(indices) - 1 == max(1, math.ceil(round(fraction * remaining, 9)))
                gaps = [later - earlier for earlier, later in zip(indices, indices[1:], strict=False)]
                assert max(gaps) - min(gaps) <= 1  # evenly spaced in index
            strided = strided_completion_indices(num_steps, start, 1.0, 2)
            assert strided[-1] == num_steps and strided[:-1] == list(range(start, num_steps, 2))
            assert strided_completion_indices(num_steps, start, 0.4, 1) == completion_indices(num_steps, start, 0.4)
    assert evenly_spaced_indices(3, 16, 6) == completion_indices(16, 3, 0.4)  # ceil(0.4 * 13) intervals
    with pytest.raises(ValueError, match="completion_steps_fraction"):
        completion_indices(16, 3, 0.0)
    with pytest.raises(ValueError, match="start"):
        completion_indices(16, 16, 0.5)
    with pytest.raises(ValueError, match="granularities"):
        strided_completion_indices(16, 3, 1.0, 0)


def test_first_order_step_is_ddim_and_euler_and_the_last_step_lands_on_x0():
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 3, 4, generator=generator), torch.randn(5, 3, 4, generator=generator)
    sigma = torch.tensor([1.0, 0.9, 0.6, 0.3, 0.1])
    sigma_next = torch.tensor([0.8, 0.5, 0.55, 0.05, 0.0])
    view = (-1, 1, 1)
    latents = (1 - sigma.view(view)) * x0 + sigma.view(view) * noise
    velocity = noise - x0  # the exact velocity of these samples: DDIM stays on their straight line
    next_latents, data_prediction = dpmpp_2m_step(latents, velocity, sigma, sigma_next)
    on_the_line = (1 - sigma_next.view(view)) * x0 + sigma_next.view(view) * noise
    torch.testing.assert_close(next_latents, on_the_line, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(data_prediction, x0, rtol=1e-5, atol=1e-5)
    euler = latents + (sigma_next - sigma).view(view) * velocity
    torch.testing.assert_close(next_latents, euler, rtol=1e-5, atol=1e-5)
    # Per-sample sigmas give row by row what scalar sigmas give.
    for i in range(5):
        row, _ = dpmpp_2m_step(latents[i : i + 1], velocity[i : i + 1], float(sigma[i]), float(sigma_next[i]))
        torch.testing.assert_close(row, next_latents[i : i + 1], rtol=0, atol=0)
    # The step to sigma 0 ends on the data prediction x - sigma v even with a history (no extrapolation there).
    other = torch.randn(1, 3, 4, generator=generator)
    last, x0_now = dpmpp_2m_step(latents[4:], other, 0.1, 0.0, previous_x0=torch.randn(1, 3, 4), sigma_previous=0.3)
    torch.testing.assert_close(last, latents[4:] - 0.1 * other, rtol=0, atol=0)
    torch.testing.assert_close(last, x0_now, rtol=0, atol=0)


def test_dpmpp_2m_solves_the_gaussian_flow_far_better_than_euler():
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    # The training schedule, down to sigma 0: the paper's T = 16 with shift 3.
    paper_path = shifted_sigmas(16, 3.0).tolist()
    # Measured (torch 2.14 and the minimum versions): Euler 0.44, DPM-Solver++ 2M 0.015 (29x).
    assert _solver_error(paper_path, "euler", x) > 5 * _solver_error(paper_path, "dpmpp_2m", x)
    # Convergence order on a path that stops before sigma 0 (where the last step is first order by design):
    # halving the step divides Euler's error by about 2 and DPM-Solver++ 2M's by more than 4.
    euler, dpm = {}, {}
    for num_steps in (32, 64):
        path = torch.linspace(1.0, 0.05, num_steps + 1).tolist()
        euler[num_steps], dpm[num_steps] = _solver_error(path, "euler", x), _solver_error(path, "dpmpp_2m", x)
    # Measured: Euler 0.143 -> 0.072 (1.98x), DPM-Solver++ 2M 3.6e-3 -> 4.5e-4 (8.2x).
    assert 1.5 < euler[32] / euler[64] < 2.5
    assert dpm[32] / dpm[64] > 3.5
    assert dpm[64] < 1e-3


def test_dpmpp_2m_step_refuses_bad_sigmas():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="sigma > sigma_next"):
        dpmpp_2m_step(x, x, 0.3, 0.5)
    with pytest.raises(ValueError, match="shape"):
        dpmpp_2m_step(x, x, torch.tensor([0.5, 0.4, 0.3]), 0.1)
    with pytest.raises(ValueError, match="sigma_previous"):
        dpmpp_2m_step(x, x, 0.5, 0.3, previous_x0=x)


def test_granularity_advantages_add_up_on_the_trained_group():
    advantages = torch.arange(12.0).view(6, 2)  # 3 trained groups, then their stride-2 groups
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    summed = sum_advantages_into_targets(advantages, target)
    torch.testing.assert_close(summed[:3], advantages[:3] + advantages[3:])
    assert bool((summed[3:] == 0).all())
    torch.testing.assert_close(sum_advantages_into_targets(advantages, torch.arange(6)), advantages)
    with pytest.raises(ValueError, match="one target per group"):
        sum_advantages_into_targets(advantages, target[:4])


def test_config_refuses_bad_completion_options(tmp_path):
    for overrides, field in (
        (dict(completion_solver="heun"), "completion_solver"),
        (dict(completion_steps_fraction=1.5), "completion_steps_fraction"),
        (dict(completion_granularities=[1, 1]), "completion_granularities"),
        (dict(completion_granularities=[0]), "completion_granularities"),
        (dict(algorithm="mix-grpo", completion_solver="dpmpp_2m"), "E-GRPO's options"),
    ):
        with pytest.raises(ValueError, match=field):
            EGRPOConfig(output_dir=str(tmp_path), **overrides)


# ------------------------------------------------------------------ the rollout engine and the trainer


def _expected_evaluations_per_prompt(plan, fraction, granularities):
    """The closed form, written out: T for the anchor; per merged step landing at e < T and per stride g, G times
    the intervals of a completion over the ceil((T - e) / g) strided intervals, of which ceil(fraction * n) kept."""
    total = STEPS
    for step in plan:
        for granularity in granularities:
            strided_intervals = math.ceil((STEPS - step.end) / granularity)
            if strided_intervals:
                total += G * max(1, math.ceil(round(fraction * strided_intervals, 9)))
    return total


COMPLETIONS = [
    dict(),
    dict(completion_solver="dpmpp_2m", completion_steps_fraction=0.4),
    dict(completion_solver="dpmpp_2m", completion_steps_fraction=0.2),
    dict(completion_granularities=[1, 2]),
    dict(completion_granularities=[1, 2], async_rewards=True),  # prompt by prompt: concat_rollouts joins them
]


@pytest.mark.parametrize(
    "completion", COMPLETIONS, ids=["euler", "dpmpp_2m-0.4", "dpmpp_2m-0.2", "strides-1-2", "strides-1-2-async"]
)
def test_rows_equal_the_closed_form_and_the_on_policy_ratio_is_one(tmp_path, completion):
    trainer = tiny_trainer(tmp_path, max_steps=1, rollout_batch_size=5, per_device_train_batch_size=3, **completion)
    plan = trainer.strategy.merge_plan
    expected = _expected_evaluations_per_prompt(
        plan, completion.get("completion_steps_fraction", 1.0), completion.get("completion_granularities", [1])
    )
    assert trainer.evaluations_per_prompt() == expected
    rows = []
    velocity = trainer.adapter.velocity

    def counting_velocity(model, latents, *args, **kwargs):
        if not torch.is_grad_enabled():  # sampling; the update's forwards run with gradients
            rows.append(len(latents))
        return velocity(model, latents, *args, **kwargs)

    trainer.adapter.velocity = counting_velocity
    scores, updates = record_calls(trainer, "score"), record_calls(trainer, "update")
    metrics = trainer.step()
    assert sum(rows) == metrics["trajectory_evaluations"] == 2 * expected
    assert metrics["ratio/on_policy_max_abs_dev"] < 1e-5
    # The update trains each sample with the sum of its groups' advantages, one group per stride.
    rewards = torch.cat([result[0] for _, result in scores])
    advantages = group_advantages(rewards, clip=trainer.config.advantage_clip, eps=trainer.config.advantage_eps)
    (rollouts, trained_advantages), _ = updates[0]
    num_strides = len(completion.get("completion_granularities", [1]))
    assert rollouts.num_groups == num_strides * 2 * len(plan) == len(rewards)
    trained, target = rollouts.sample_group[:, 0], rollouts.advantage_target
    assert sorted(target.tolist()) == sorted(trained.tolist() * num_strides)
    # A stride's group scores the same prompt and merged step as the group it adds to.
    assert torch.equal(rollouts.group_prompt, rollouts.group_prompt[target])
    assert torch.equal(rollouts.group_step % len(plan), rollouts.group_step[target])
    expected_advantages = torch.stack([advantages[target == group].sum(dim=0) for group in trained.tolist()])
    torch.testing.assert_close(trained_advantages[trained], expected_advantages)


def _rollouts(pipe, adapter, schedule, plan, conditioning, noise, **completion):
    return sample_rollouts(
        adapter,
        pipe.transformer,
        schedule,
        plan,
        conditioning,
        noise,
        G,
        0.7,
        torch.Generator().manual_seed(1),
        # One row per transformer call: a row's velocity then cannot depend on which other rows share its call
        # (the completions change the batches; on a CPU a different batch size moves results by ~1e-7).
        batch_size=1,
        **completion,
    )


def test_completion_options_change_only_the_images():
    pipe = build_tiny_flux_pipeline(seed=1)
    adapter = get_adapter(pipe, height=64, width=64, max_sequence_length=32)
    schedule = adapter.schedule(STEPS, 3.0)
    noise = adapter.initial_noise(2, torch.Generator().manual_seed(0))
    conditioning = adapter.encode_prompts(["a red apple", "a fire truck on a bridge"])
    plan = plan_merges(schedule.sigmas, 0.7, 2.2, 4)
    euler = _rollouts(pipe, adapter, schedule, plan, conditioning, noise)
    dpm = _rollouts(
        pipe, adapter, schedule, plan, conditioning, noise, completion_solver="dpmpp_2m", completion_steps_fraction=0.4
    )
    strides = _rollouts(pipe, adapter, schedule, plan, conditioning, noise, completion_granularities=(1, 2))
    for other in (dpm, strides):
        # The anchors, the branch points, the samples x' and their log-probabilities are those of the paper's way.
        for name in ("anchor_latents", "step_latents", "samples", "log_probs", "step_start", "step_length"):
            torch.testing.assert_close(getattr(other, name), getattr(euler, name), rtol=0, atol=0)
    assert not torch.allclose(dpm.images, euler.images)
    # Strides: the first stride's groups are the paper's, the stride-2 groups score the same samples otherwise.
    num_groups = euler.num_groups
    assert strides.num_groups == 2 * num_groups
    torch.testing.assert_close(strides.images[:num_groups], euler.images, rtol=0, atol=0)
    assert strides.group_target.tolist() == 2 * list(range(num_groups))
    assert strides.group_prompt.tolist() == 2 * euler.group_prompt.tolist()
    assert strides.group_step.tolist() == euler.group_step.tolist() + (euler.group_step + len(plan)).tolist()

    # One branch continued by hand with DPM-Solver++ 2M over its completion indices lands on the stored image.
    g, member = 3, 2
    start, length = int(dpm.step_start[g]), int(dpm.step_length[g])
    prompt = int(dpm.group_prompt[g])
    latents, previous_x0, previous_sigma = dpm.samples[g, member : member + 1], None, None
    path = completion_indices(STEPS, start + length, 0.4)
    for index, next_index in zip(path[:-1], path[1:], strict=True):
        velocity = adapter.velocity(
            pipe.transformer,
            latents,
            schedule.timesteps[index].view(1),
            {name: tensor[prompt : prompt + 1] for name, tensor in conditioning.items()},
        )
        sigma = schedule.sigmas[index]
        latents, previous_x0 = dpmpp_2m_step(
            latents, velocity, sigma, schedule.sigmas[next_index], previous_x0, previous_sigma
        )
        previous_sigma = sigma
    torch.testing.assert_close(adapter.decode(latents)[0], dpm.images[g, member], rtol=1e-4, atol=1e-4)


def test_completion_fidelity_benchmark_counts_the_closed_form_rows(tmp_path):
    """The benchmark script in its smallest run, so that it cannot rot: its rows equal the closed form, the
    reference correlates perfectly with itself and every setting stays positively correlated with it."""
    import json
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import completion_fidelity

    results = completion_fidelity.main(["--seeds", "1", "--iterations", "1", "--out", str(tmp_path)])
    assert list(results) == list(completion_fidelity.SETTINGS)
    for values in results.values():
        assert values["rows_per_iteration"] == values["closed_form_rows_per_iteration"]
        assert values["advantage_correlation"] > 0
    assert results["euler 1.0 (paper)"]["advantage_correlation"] == pytest.approx(1.0)
    assert results["dpmpp_2m 0.4"]["rows_per_iteration"] < results["euler 1.0 (paper)"]["rows_per_iteration"]
    saved = json.loads((tmp_path / "completion_fidelity.json").read_text())
    assert saved["results"] == results
    assert "| dpmpp_2m 0.4 |" in (tmp_path / "completion_fidelity.md").read_text()
