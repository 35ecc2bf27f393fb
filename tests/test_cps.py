"""Coefficient-preserving sampling (``sde_type="cps"``): the merged CPS step against its closed forms, the CPS
entropy and merge plan, the refusals, and the on-policy ratio, row counts and resume on the tiny FLUX pipeline."""

import math

import pytest
import torch

from helpers import tiny_trainer
from trl_flow_egrpo import EGRPOConfig
from trl_flow_egrpo.algorithms import build_strategy
from trl_flow_egrpo.merging import plan_merges, step_entropy
from trl_flow_egrpo.schedule import Schedule, shifted_sigmas
from trl_flow_egrpo.sde import cps_mean_std, euler_step, sde_step, step_mean_std

SIGMAS = shifted_sigmas(16, 3.0).float()  # the paper's schedule, T = 16, shift 3
A = 0.7
COS, SIN = math.cos(A * math.pi / 2), math.sin(A * math.pi / 2)  # 0.45399, 0.89101
SQRT_2PI_E = math.sqrt(2 * math.pi * math.e)  # 4.13273


def _inputs(batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, batch, 4, 5, 5, generator=generator).unbind(0)


def test_single_cps_step_is_the_closed_form():
    latents, velocity = _inputs()
    index = torch.tensor([0, 6, 14])
    mean, std = cps_mean_std(latents, velocity, SIGMAS, index, 1, A)
    s, s_next = SIGMAS[index].view(-1, 1, 1, 1), SIGMAS[index + 1]
    expected_std = s_next * SIN
    clean, noise = latents - s * velocity, latents + (1 - s) * velocity
    # (1 - s') x0 + sqrt(s'^2 - std^2) e: the form of the CPS paper.
    root = torch.sqrt(s_next**2 - expected_std**2).view(-1, 1, 1, 1)
    torch.testing.assert_close(std, expected_std)
    torch.testing.assert_close(mean, (1 - s_next.view(-1, 1, 1, 1)) * clean + root * noise)


@pytest.mark.parametrize("length", [1, 2, 3, 5])
def test_merged_cps_step_is_l_single_steps_with_the_clean_prediction_frozen(length):
    """Exact composition of Gaussians: each sub-step j (one interval) is the library's single CPS step at the
    velocity ``(x_j - x0) / s_j`` that keeps the clean prediction ``x0``; its mean is linear in ``x_j`` with
    coefficient ``s_{j+1} cos(theta) / s_j`` on the noise part, so the variances add up as below."""
    latents, velocity = _inputs(batch=1)
    k = 3
    s = SIGMAS[k]
    clean = latents - s * velocity
    mean, variance = latents.double(), 0.0
    for j in range(k, k + length):
        s_j, s_next = SIGMAS[j].double(), SIGMAS[j + 1].double()
        sub_mean, sub_std = cps_mean_std(mean, (mean - clean) / s_j, SIGMAS.double(), j, 1, A)
        mean, variance = sub_mean.double(), (s_next * COS / s_j) ** 2 * variance + float(sub_std) ** 2
    merged_mean, merged_std = cps_mean_std(latents, velocity, SIGMAS, k, length, A)
    torch.testing.assert_close(merged_mean, mean.float(), atol=1e-6, rtol=1e-5)
    assert float(merged_std) ** 2 == pytest.approx(float(variance), rel=1e-5)
    # The closed form: std = s' sqrt(1 - cos^2l), a single CPS step of angle theta_l.
    assert float(merged_std) == pytest.approx(float(SIGMAS[k + length]) * math.sqrt(1 - COS ** (2 * length)), rel=1e-6)


def test_merged_cps_step_matches_a_simulation_of_its_sub_steps():
    """Monte Carlo: draw the l = 3 sub-steps one by one (x0 frozen) for many samples; the landing points have the
    merged step's mean and std (the exact check is the test above; this one shares no algebra with it)."""
    latents, velocity = _inputs(batch=1, seed=1)
    k, length, draws = 2, 3, 20000
    clean = latents - SIGMAS[k] * velocity
    x = latents.expand(draws, -1, -1, -1).clone()
    generator = torch.Generator().manual_seed(2)
    for j in range(k, k + length):
        x = sde_step(x, (x - clean) / SIGMAS[j], SIGMAS, j, 1, A, generator=generator, sde_type="cps").sample
    mean, std = cps_mean_std(latents, velocity, SIGMAS, k, length, A)
    # Standard errors: std / sqrt(draws) = 0.006 for the mean; the std's about std / sqrt(2 draws) relative.
    torch.testing.assert_close(x.mean(0, keepdim=True), mean, atol=5 * float(std) / math.sqrt(draws), rtol=0)
    assert float(x.std(0).mean()) == pytest.approx(float(std), rel=0.01)


@pytest.mark.parametrize("length", [1, 3])
def test_cps_with_no_noise_is_the_euler_step(length):
    latents, velocity = _inputs()
    index = torch.tensor([0, 4, 9])
    mean, std = cps_mean_std(latents, velocity, SIGMAS, index, length, 0.0)
    assert torch.equal(std, torch.zeros(3))
    d = (SIGMAS[index + length] - SIGMAS[index]).view(-1, 1, 1, 1)
    torch.testing.assert_close(mean, latents + d * velocity)
    if length == 1:
        torch.testing.assert_close(mean, euler_step(latents, velocity, SIGMAS, index))


@pytest.mark.parametrize("length", [1, 2, 4])
def test_cps_preserves_the_noise_coefficient(length):
    """x0 fixed, x = (1 - s) x0 + s e with e ~ N(0, I) (velocity e - x0): the landing point's noise part
    ``x' - (1 - s') x0`` is ``s'`` times a standard normal, exactly (variance (s' cos_l)^2 + std^2 = s'^2) and
    by sampling."""
    k, draws = 5, 50000
    s, s_next = SIGMAS[k], SIGMAS[k + length]
    generator = torch.Generator().manual_seed(3)
    clean = torch.randn(1, 8, generator=generator).expand(draws, -1)
    noise = torch.randn(draws, 8, generator=generator)
    latents = (1 - s) * clean + s * noise
    step = sde_step(latents, noise - clean, SIGMAS, k, length, A, generator=generator, sde_type="cps")
    cos_l = (step.mean - (1 - s_next) * clean) / (s_next * noise)  # the coefficient of e in the mean
    assert float(cos_l.mean()) == pytest.approx(COS**length, rel=1e-4)
    assert float((s_next * cos_l.mean()) ** 2 + step.std[0] ** 2) == pytest.approx(float(s_next) ** 2, rel=1e-4)
    unit = (step.sample - (1 - s_next) * clean) / s_next
    assert float(unit.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(unit.var()) == pytest.approx(1.0, abs=0.01)


def test_cps_entropy_is_the_closed_form_and_the_sampler_std():
    # exp(h(k, 1)) = sqrt(2 pi e) sin(0.35 pi) sigmas[k + 1] = 3.6823 sigmas[k + 1]; e.g. k = 0: 3.6823 * 0.9783.
    table = [3.602, 3.515, 3.419, 3.314, 3.198, 3.069, 2.924, 2.762, 2.578, 2.367, 2.124, 1.841, 1.506, 1.105, 0.614]
    assert [round(step_entropy(SIGMAS, k, 1, A, "cps"), 3) for k in range(15)] == table
    assert step_entropy(SIGMAS, 15, 1, A, "cps") == 0.0  # lands at sigma 0: no noise
    latents, velocity = _inputs(batch=1)
    for k, length in ((0, 1), (0, 2), (2, 2), (7, 3), (10, 5)):
        closed = SQRT_2PI_E * float(SIGMAS.double()[k + length]) * math.sqrt(1 - COS ** (2 * length))
        assert step_entropy(SIGMAS, k, length, A, "cps") == pytest.approx(closed, rel=1e-12)
        _, std = cps_mean_std(latents, velocity, SIGMAS, k, length, A)
        assert step_entropy(SIGMAS, k, length, A, "cps") == pytest.approx(SQRT_2PI_E * float(std), rel=1e-6)
    # Not monotone in l: the angle term grows, sigma falls (k = 0: 3.602, 3.860, 3.821).
    assert step_entropy(SIGMAS, 0, 2, A, "cps") > step_entropy(SIGMAS, 0, 1, A, "cps")
    assert step_entropy(SIGMAS, 0, 3, A, "cps") < step_entropy(SIGMAS, 0, 2, A, "cps")


def test_cps_merge_plans_at_the_paper_setting():
    def plan(tau, **kwargs):
        return [(step.start, step.length) for step in plan_merges(SIGMAS, A, tau, 8, sde_type="cps", **kwargs)]

    # tau = 2.2: step 7 alone has 3.6823 * sigmas[8] = 3.6823 * 0.75 = 2.762 >= 2.2, and exp(h(k, 1)) falls with k,
    # so all 8 steps clear tau alone: no merge (the SDE merges steps 2-7 at the same tau).
    assert plan(2.2) == [(k, 1) for k in range(8)]
    assert plan(2.2, windows="partition") == [(k, 1) for k in range(8)]
    # tau = 3.5: step 1 alone 3.6823 * 0.9545 = 3.515 clears; step 2 alone 3.6823 * 0.9286 = 3.419 does not, merged
    # over 2 intervals 4.1327 * 0.9 * sqrt(1 - 0.45399^4) = 4.1327 * 0.9 * 0.97853 = 3.640 does.
    assert plan(3.5) == [(0, 1), (1, 1), (2, 2), (3, 2), (4, 2), (5, 2), (6, 2), (7, 2)]
    # tau = 3.0: step 7 never clears (l = 1, 2, 3: 2.762, 4.1327 * 0.7 * 0.97853 = 2.831, 4.1327 * 0.6429 * 0.99553
    # = 2.645): the length of largest entropy, 2, is taken.
    assert plan(3.0)[-1] == (7, 2)
    # The SDE's plan is unchanged (METHOD.md's table).
    assert [(s.start, s.length) for s in plan_merges(SIGMAS, A, 2.2, 8)] == [
        (0, 1),
        (1, 1),
        (2, 2),
        (3, 2),
        (4, 2),
        (5, 3),
        (6, 3),
        (7, 3),
    ]


def test_cps_never_trains_a_step_landing_at_sigma_zero():
    # Fixed merges stop one interval before the end; start index T - 1 cannot be trained at all.
    lengths = [step.length for step in plan_merges(SIGMAS, A, 0.0, 15, merge=6, sde_type="cps")]
    assert lengths[-3:] == [3, 2, 1] and max(s + n for s, n in enumerate(lengths)) == 15
    with pytest.raises(ValueError, match="lands at sigma 0.*Lower num_active_steps"):
        plan_merges(SIGMAS, A, 2.2, 16, sde_type="cps")
    with pytest.raises(ValueError, match="lands at sigma 0"):
        plan_merges(SIGMAS, A, 2.2, 8, first_step=8, sde_type="cps")
    with pytest.raises(ValueError, match="sde_type='ode' is not allowed"):
        plan_merges(SIGMAS, A, 2.2, 8, sde_type="ode")


def _strategy(algorithm, num_steps=8, **overrides):
    sigmas = shifted_sigmas(num_steps, 3.0).float()
    values = dict(output_dir="unused", algorithm=algorithm, num_inference_steps=num_steps, num_active_steps=4)
    config = EGRPOConfig(**{**values, **overrides})
    return build_strategy(config, Schedule(sigmas=sigmas, timesteps=sigmas[:-1] * 1000))


def test_cps_options_are_validated_with_clear_errors():
    for overrides, message in (
        (dict(sde_type="ode"), "sde_type='ode' is not allowed: sde_type must be 'sde'"),
        (dict(sde_type="cps", algorithm="dance-grpo"), "DanceGRPO samples with its own constant-noise SDE"),
        (dict(sde_type="cps", noise_level=1.5), "noise_level=1.5 is not allowed: noise_level must be <= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            EGRPOConfig(output_dir="unused", **overrides)
    with pytest.raises(ValueError, match="would train the last step.*Lower timestep_fraction"):
        _strategy("flow-grpo", sde_type="cps", timestep_fraction=1.0)
    with pytest.raises(ValueError, match="lands at sigma 0"):
        _strategy("e-grpo", sde_type="cps", num_active_steps=8)
    with pytest.raises(ValueError, match="must be one of"):
        step_mean_std(*_inputs(), SIGMAS, 0, 1, A, "ode")


def test_strategies_use_the_configured_sampler():
    latents, velocity = _inputs()
    start = torch.tensor([0, 3, 5])
    expected = cps_mean_std(latents, velocity, shifted_sigmas(8, 3.0).float(), start, 2, A)
    for algorithm in ("e-grpo", "flow-grpo", "mix-grpo", "mix-grpo-flash"):
        strategy = _strategy(algorithm, sde_type="cps")
        for actual, wanted in zip(strategy.step_distribution(latents, velocity, start, 2), expected, strict=True):
            torch.testing.assert_close(actual, wanted)


def test_flow_grpo_kl_under_cps_is_the_official_expression():
    flow = _strategy("flow-grpo", sde_type="cps")
    sigmas = flow.schedule.sigmas
    latents, velocity, reference_velocity = torch.randn(3, 2, 4, 4).unbind(0)
    start = torch.tensor([0, 5])
    mean, std = flow.step_distribution(latents, velocity, start, 1)
    reference_mean, _ = flow.step_distribution(latents, reference_velocity, start, 1)
    # Flow-GRPO's KL divides by 2 std_dev_t^2, and under CPS its std_dev_t is sigma_{k+1} sin(a pi / 2): the step's
    # std, so the KL is the one between the step's two Gaussians (no sigma-decrease factor, unlike its SDE).
    std_dev_t = sigmas[start + 1] * SIN
    official = (mean - reference_mean).pow(2).flatten(1).mean(dim=1) / (2 * std_dev_t**2)
    torch.testing.assert_close(flow.kl_to_reference(mean, reference_mean, std, start, 1), official)


# Tiny FLUX runs (tiny_config: T = 8, 4 active steps, G = 4, 2 prompts). E-GRPO at tau = 3.5 under CPS plans
# (0, 1) (1, 2) (2, 1) (3, 1): step 1 merges (3.314 -> 3.370), step 2 clears nowhere and takes its largest, l = 1.
CPS_EGRPO = dict(sde_type="cps", entropy_threshold=3.5)


@pytest.mark.parametrize(
    ("algorithm", "overrides"),
    [("e-grpo", CPS_EGRPO), ("flow-grpo", dict(sde_type="cps")), ("mix-grpo", dict(sde_type="cps"))],
)
def test_cps_is_on_policy_and_costs_the_rows_of_its_closed_form(tmp_path, algorithm, overrides):
    trainer = tiny_trainer(
        tmp_path,
        algorithm=algorithm,
        max_steps=1,
        rollout_batch_size=5,
        per_device_train_batch_size=3,
        optimizer_step="iteration",
        mix_window_size=3,
        **overrides,
    )
    if algorithm == "e-grpo":
        assert [(s.start, s.length) for s in trainer.merge_plan] == [(0, 1), (1, 2), (2, 1), (3, 1)]
        # T for the anchor, then G * (T - k - l) per merged step: 8 + 4 * (7 + 5 + 5 + 4).
        closed_form = 8 + 4 * (7 + 5 + 5 + 4)
    else:
        closed_form = 4 * 8  # G trajectories of T steps (MixGRPO's first window starts at step 0: no prefix)
    assert trainer.evaluations_per_prompt() == closed_form
    metrics = trainer.step()
    assert metrics["ratio/on_policy_max_abs_dev"] < 1e-5
    assert metrics["trajectory_evaluations"] == 2 * closed_form


def test_cps_costs_the_rows_of_the_sde_on_the_same_plan():
    # CPS changes the step's Gaussian, not what is evaluated: with the same (fixed) plan the rows are the same.
    sde, cps = (_strategy("e-grpo", merge="2", sde_type=kind) for kind in ("sde", "cps"))
    assert [(s.start, s.length) for s in cps.merge_plan] == [(s.start, s.length) for s in sde.merge_plan]
    assert cps.evaluations_per_prompt() == sde.evaluations_per_prompt() == 8 + 12 * (6 + 5 + 4 + 3)


@pytest.mark.parametrize(("algorithm", "overrides"), [("e-grpo", CPS_EGRPO), ("flow-grpo", dict(sde_type="cps"))])
def test_cps_resumes_exactly(tmp_path, algorithm, overrides):
    keys = ["loss", "ratio/mean", "reward/weighted_mean", "grad_norm"]

    def run(path, **kwargs):
        return tiny_trainer(path, algorithm=algorithm, max_steps=3, **overrides, **kwargs).train().log_history

    uninterrupted = run(tmp_path / "a", save_steps=1)
    resumed = run(tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    for key in keys:
        assert [row[key] for row in resumed[1:]] == [row[key] for row in uninterrupted[1:]], key
