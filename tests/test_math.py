"""The math of METHOD.md sections 1-6 against closed forms and the reference tables."""

import itertools
import math

import pytest
import torch

from trl_flow_egrpo import (
    euler_step,
    group_advantages,
    plan_merges,
    ppo_clip_loss,
    sde_step,
    shifted_sigmas,
    step_entropy,
)
from trl_flow_egrpo.sde import diffusion_coefficient, gaussian_kl

SIGMAS = shifted_sigmas(16, 3.0)
REFERENCE_SIGMAS = [
    1.0,
    0.9783,
    0.9545,
    0.9286,
    0.9,
    0.8684,
    0.8333,
    0.7941,
    0.75,
    0.7,
    0.6429,
    0.5769,
    0.5,
    0.4091,
    0.3,
    0.1667,
    0,
]
REFERENCE_ENTROPY = [
    2.893,
    2.989,
    2.137,
    1.763,
    1.542,
    1.392,
    1.281,
    1.193,
    1.120,
    1.056,
    0.997,
    0.937,
    0.872,
    0.795,
    0.692,
    0.528,
]


def test_schedule_matches_method_table():
    assert SIGMAS.tolist() == pytest.approx(REFERENCE_SIGMAS, abs=5e-5)
    assert bool((SIGMAS[1:] < SIGMAS[:-1]).all())


def test_step_entropy_matches_method_table():
    entropies = [step_entropy(SIGMAS, k, 1, 0.7) for k in range(16)]
    # The table is rounded from 4-digit sigmas; 0.5% covers that rounding.
    assert entropies == pytest.approx(REFERENCE_ENTROPY, rel=5e-3)


def test_step_entropy_grows_with_merge_length():
    for k in range(15):
        values = [step_entropy(SIGMAS, k, length, 0.7) for length in range(1, 17 - k)]
        assert all(b > a for a, b in itertools.pairwise(values))


def test_step_entropy_closed_form():
    k, length, a = 5, 3, 0.7
    s, s_next = SIGMAS[k].item(), SIGMAS[k + length].item()
    std = a * math.sqrt(s / (1 - s)) * math.sqrt(s - s_next)
    entropy = 0.5 * math.log(2 * math.pi * math.e * std**2)
    assert step_entropy(SIGMAS, k, length, a) == pytest.approx(math.exp(entropy), rel=1e-9)


@pytest.mark.parametrize(
    "tau, expected",
    [
        (0.0, [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1)]),
        (2.2, [(0, 1), (1, 1), (2, 2), (3, 2), (4, 2), (5, 3), (6, 3), (7, 3)]),
        (2.6, [(0, 1), (1, 1), (2, 2), (3, 3), (4, 3), (5, 4), (6, 4), (7, 4)]),
    ],
)
def test_overlap_plans_match_method_table(tau, expected):
    plan = plan_merges(SIGMAS, 0.7, tau, 8)
    assert [(s.start, s.length) for s in plan] == expected
    for step in plan:
        assert step.entropy == pytest.approx(step_entropy(SIGMAS, step.start, step.length, 0.7))
        assert tau == 0 or step.entropy >= tau
        if step.length > 1:  # the shortest merge that clears tau: one interval less does not
            assert step_entropy(SIGMAS, step.start, step.length - 1, 0.7) < tau


def test_partition_plan_matches_method_table():
    plan = plan_merges(SIGMAS, 0.7, 2.2, 8, windows="partition")
    assert [(s.start, s.length) for s in plan] == [(0, 1), (1, 1), (2, 2), (4, 2), (6, 3)]


def test_fixed_and_no_merging():
    assert [(s.start, s.length) for s in plan_merges(SIGMAS, 0.7, 2.2, 4, merge=4)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert [(s.start, s.length) for s in plan_merges(SIGMAS, 0.7, 2.2, 8, merge=None)] == [(k, 1) for k in range(8)]
    assert [(s.start, s.length) for s in plan_merges(SIGMAS, 0.7, 2.2, 8, merge=6, windows="partition")] == [
        (0, 6),
        (6, 6),
    ]


def test_merge_lengths_are_capped_at_the_end_of_the_schedule():
    plan = plan_merges(SIGMAS, 0.7, 100.0, 16)
    assert all(step.end == 16 for step in plan)
    assert [s.length for s in plan_merges(SIGMAS, 0.7, 0.0, 16, merge=6)][-3:] == [3, 2, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_active_steps=17), "num_active_steps"),
        (dict(num_active_steps=0), "num_active_steps"),
        (dict(merge=0), "fixed merge length"),
        (dict(merge="sometimes"), "merge must be"),
        (dict(windows="sliding"), "windows"),
    ],
)
def test_plan_rejects_bad_arguments(kwargs, message):
    arguments = dict(sigmas=SIGMAS, noise_level=0.7, entropy_threshold=2.2, num_active_steps=8) | kwargs
    with pytest.raises(ValueError, match=message):
        plan_merges(**arguments)


def _random_state(batch=3, shape=(4, 5)):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *shape, generator=generator), torch.randn(batch, *shape, generator=generator)


def test_noise_level_zero_is_the_euler_step():
    x, v = _random_state()
    for k in (0, 3, 15):
        step = sde_step(x, v, SIGMAS, k, 1, noise_level=0.0)
        torch.testing.assert_close(step.sample, euler_step(x, v, SIGMAS, k), rtol=0, atol=1e-6)
        torch.testing.assert_close(step.sample, x + (SIGMAS[k + 1] - SIGMAS[k]).float() * v)
        assert step.log_prob is None and bool((step.std == 0).all())


def test_merged_sde_step_closed_form():
    x, v = _random_state()
    k, length, a = 2, 3, 0.7
    noise = torch.randn_like(x)
    step = sde_step(x, v, SIGMAS, k, length, a, noise=noise)
    s, s_next = SIGMAS[k].double(), SIGMAS[k + length].double()
    c = a * torch.sqrt(s / (1 - s))
    d = s_next - s
    mean = x.double() + (v.double() + c**2 / (2 * s) * (x.double() + (1 - s) * v.double())) * d
    std = c * torch.sqrt(-d)
    torch.testing.assert_close(step.mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step.std.double(), std.expand(3), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(step.sample, step.mean + step.std.view(-1, 1, 1) * noise)
    assert step.sample.dtype == step.mean.dtype == step.log_prob.dtype == torch.float32


def test_first_step_uses_sigma_one_substitute():
    c = diffusion_coefficient(SIGMAS.float(), 0, 0.7)
    assert c.item() == pytest.approx(0.7 * math.sqrt(1 / (1 - SIGMAS[1].item())), rel=1e-5)


def test_log_prob_is_the_gaussian_density_averaged_over_elements():
    x, v = _random_state()
    step = sde_step(x, v, SIGMAS, 4, 2, 0.7, generator=torch.Generator().manual_seed(1))
    for i in range(len(x)):
        normal = torch.distributions.Normal(step.mean[i].double(), step.std[i].double())
        expected = normal.log_prob(step.sample[i].double()).mean()
        assert step.log_prob[i].item() == pytest.approx(expected.item(), rel=1e-5)
    # Re-evaluating the stored sample gives the same log-prob.
    again = sde_step(x, v, SIGMAS, 4, 2, 0.7, sample=step.sample)
    torch.testing.assert_close(again.log_prob, step.log_prob)


def test_per_sample_indices_equal_separate_steps():
    x, v = _random_state()
    noise = torch.randn_like(x)
    index, length = torch.tensor([0, 5, 7]), torch.tensor([1, 3, 2])
    batched = sde_step(x, v, SIGMAS, index, length, 0.7, noise=noise)
    for i in range(3):
        single = sde_step(
            x[i : i + 1], v[i : i + 1], SIGMAS, int(index[i]), int(length[i]), 0.7, noise=noise[i : i + 1]
        )
        torch.testing.assert_close(batched.sample[i], single.sample[0])
        torch.testing.assert_close(batched.log_prob[i], single.log_prob[0])


def test_sde_step_rejects_steps_past_the_end():
    x, v = _random_state()
    with pytest.raises(ValueError, match="merge_length"):
        sde_step(x, v, SIGMAS, 14, 3, 0.7)


def test_gaussian_kl_closed_form():
    mean, reference = torch.zeros(2, 3), torch.full((2, 3), 0.5)
    std = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(gaussian_kl(mean, reference, std), torch.tensor([0.125, 0.03125]))


def test_group_advantages_single_reward():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    advantages = group_advantages(rewards)
    mean, std = rewards[0].mean(), rewards[0].std(unbiased=True)
    torch.testing.assert_close(advantages[0], (rewards[0] - mean) / (std + 1e-8))
    torch.testing.assert_close(advantages[1], torch.zeros(4))  # no signal in a constant group


def test_group_advantages_clipping():
    rewards = torch.tensor([[0.0] * 99 + [1.0]])
    assert group_advantages(rewards, clip=5.0).max().item() == 5.0
    assert group_advantages(rewards, clip=None).max().item() > 9.0


def test_group_advantages_aggregations():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.stack([torch.randn(3, 6, generator=generator), 100 * torch.randn(3, 6, generator=generator)], -1)
    weights = torch.tensor([0.7, 0.3])

    def normalize(r):
        return (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-8)

    by_advantage = group_advantages(rewards, weights, "advantage", clip=None)
    torch.testing.assert_close(by_advantage, 0.7 * normalize(rewards[..., 0]) + 0.3 * normalize(rewards[..., 1]))
    by_sum = group_advantages(rewards, weights, "sum", clip=None)
    torch.testing.assert_close(by_sum, normalize(0.7 * rewards[..., 0] + 0.3 * rewards[..., 1]))
    # "advantage" is scale-free; "sum" is dominated by the large-scale reward.
    scaled = rewards * torch.tensor([1.0, 1000.0])
    torch.testing.assert_close(group_advantages(scaled, weights, "advantage", clip=None), by_advantage)


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="aggregation"):
        group_advantages(torch.zeros(2, 4), aggregation="mean")
    with pytest.raises(ValueError, match="weights"):
        group_advantages(torch.zeros(2, 4, 2), weights=[1.0])
    with pytest.raises(ValueError, match="G"):
        group_advantages(torch.zeros(2, 1))


def test_ppo_clip_loss_closed_form():
    old = torch.zeros(4)
    log_prob = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.00005])).requires_grad_()
    advantages = torch.tensor([1.0, 1.0, -1.0, 2.0])
    output = ppo_clip_loss(log_prob, old, advantages, clip_range=1e-4)
    ratio = torch.tensor([1.0, 1.5, 0.5, 1.00005])
    clipped = ratio.clamp(1 - 1e-4, 1 + 1e-4)
    expected = torch.maximum(-advantages * ratio, -advantages * clipped).mean()
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert output.clipped.tolist() == [False, True, True, False]
    output.loss.backward()
    # Clipped samples get no gradient; unclipped ones get -A * r / N.
    assert log_prob.grad[1].item() == 0 and log_prob.grad[2].item() == 0
    assert log_prob.grad[0].item() == pytest.approx(-0.25)
    assert output.approx_kl.item() >= 0


def test_ppo_clip_loss_on_policy():
    log_prob = torch.randn(5)
    output = ppo_clip_loss(log_prob, log_prob.clone(), torch.randn(5), clip_range=1e-4)
    assert torch.equal(output.ratio, torch.ones(5))
    assert output.approx_kl.item() == 0 and not output.clipped.any()


def test_plan_from_a_later_first_step():
    plan = plan_merges(SIGMAS, 0.7, 0.0, 8, first_step=8)
    assert [(s.start, s.length) for s in plan] == [(k, 1) for k in range(8, 16)]
    with pytest.raises(ValueError, match="first_step"):
        plan_merges(SIGMAS, 0.7, 0.0, 9, first_step=8)
