"""GRPO-Guard's ratio normalization (EGRPOConfig.ratio_normalization): closed forms, then the trainer."""

import math

import pytest
import torch

from helpers import tiny_trainer
from trl_flow_egrpo import EGRPOConfig
from trl_flow_egrpo import trainer as trainer_module
from trl_flow_egrpo.loss import RatioNormalization, mean_drift, normalized_log_ratio, ppo_clip_loss, step_weights
from trl_flow_egrpo.schedule import shifted_sigmas
from trl_flow_egrpo.sde import gaussian_log_prob, sde_mean_std

ALGORITHMS = ["e-grpo", "flow-grpo", "dance-grpo", "mix-grpo", "mix-grpo-flash"]
D = 64  # latent elements per sample


def _log_ratio(sample, mean, old_mean, std):
    """The element-averaged log-ratio of the trainer: both Gaussians share ``std``."""
    return gaussian_log_prob(sample, mean, std) - gaussian_log_prob(sample, old_mean, std)


def test_normalized_log_ratio_is_the_mean_of_noise_times_drift():
    """Closed form: for x' = mu_old + s eps and mu = mu_old + d, the normalized log-ratio is mean(eps * d)."""
    generator = torch.Generator().manual_seed(0)
    n = 32
    old_mean, drift, eps = (torch.randn(n, D, generator=generator, dtype=torch.float64) for _ in range(3))
    drift = 0.05 * drift
    std = torch.rand(n, generator=generator, dtype=torch.float64) * 0.5 + 0.01
    sample = old_mean + std[:, None] * eps
    mean = old_mean + drift
    normalized = normalized_log_ratio(_log_ratio(sample, mean, old_mean, std), mean_drift(mean, old_mean), std)
    torch.testing.assert_close(normalized, (eps * drift).mean(dim=1), rtol=1e-9, atol=1e-12)


def test_normalized_ratios_have_mean_zero_and_the_same_spread_at_every_step():
    """Per step (three noise levels, one drift): the raw log-ratio's mean is -mean(d^2)/(2 s^2) and its spread
    rms(d)/(s sqrt(D)); the normalized one has mean 0 and spread rms(d)/sqrt(D) at every step."""
    generator = torch.Generator().manual_seed(1)
    n = 20_000
    drift = 0.02 * torch.randn(D, generator=generator, dtype=torch.float64)
    old_mean = torch.randn(D, generator=generator, dtype=torch.float64).expand(n, D)
    mean = old_mean + drift
    squared = drift.pow(2).mean().item()
    spread = math.sqrt(squared / D)
    for s in (0.5, 0.1, 0.02):
        std = torch.full((n,), s, dtype=torch.float64)
        sample = old_mean + s * torch.randn(n, D, generator=generator, dtype=torch.float64)
        raw = _log_ratio(sample, mean, old_mean, std)
        normalized = normalized_log_ratio(raw, mean_drift(mean, old_mean), std)
        tolerance = 4 / math.sqrt(n)  # relative standard error of a mean (in spreads) and of a std
        assert abs(raw.mean().item() + squared / (2 * s**2)) < tolerance * spread / s
        assert raw.std().item() == pytest.approx(spread / s, rel=tolerance)
        assert abs(normalized.mean().item()) < tolerance * spread
        assert normalized.std().item() == pytest.approx(spread, rel=tolerance)
        # The ratio itself: E[exp(N(0, v))] = exp(v / 2), 1 up to the spread's square.
        assert normalized.exp().mean().item() == pytest.approx(math.exp(spread**2 / 2), abs=tolerance * spread)
    # The raw left shift grows as 1 / s^2, its spread as 1 / s: at the low-noise step it is 4 spreads below 0.
    assert squared / (2 * 0.02**2) > 4 * spread / 0.02


def test_on_policy_the_normalized_ratio_is_exactly_one():
    generator = torch.Generator().manual_seed(2)
    mean = torch.randn(8, D, generator=generator)
    std = torch.full((8,), 0.3)
    sample = mean + std[:, None] * torch.randn(8, D, generator=generator)
    log_prob = gaussian_log_prob(sample, mean, std)
    normalization = RatioNormalization(mean_drift(mean, mean.clone()), std)
    output = ppo_clip_loss(log_prob, log_prob.clone(), torch.ones(8), 1e-4, normalization)
    assert torch.equal(output.ratio, torch.ones(8))


def test_gradient_is_the_noise_times_the_mean_gradient_s_times_the_raw_one():
    """On-policy, d(normalized ratio)/d(mu) = eps / D and d(raw ratio)/d(mu) = eps / (s D)."""
    generator = torch.Generator().manual_seed(3)
    old_mean = torch.randn(1, D, generator=generator)
    eps = torch.randn(1, D, generator=generator)
    std = torch.tensor([0.2])
    sample = old_mean + std * eps
    advantage = torch.tensor([1.5])
    gradients = {}
    for normalized in (False, True):
        mean = old_mean.clone().requires_grad_(True)
        log_prob = gaussian_log_prob(sample, mean, std)
        normalization = RatioNormalization(mean_drift(mean, old_mean), std) if normalized else None
        old_log_prob = gaussian_log_prob(sample, old_mean, std)
        ppo_clip_loss(log_prob, old_log_prob, advantage, 1e-2, normalization).loss.backward()
        gradients[normalized] = mean.grad
    torch.testing.assert_close(gradients[True], -advantage * eps / D)
    torch.testing.assert_close(gradients[False], gradients[True] / std)


def test_the_clip_acts_on_the_normalized_ratio():
    """A low-noise step whose mean moved along its sample's noise (d = c eps, c > 2 s): the raw ratio is far below
    1 (left shift) so the clip misses this positive-advantage sample; the normalized ratio exp(c mean(eps^2)) is
    above 1 + clip_range, so the clip acts and the sample's gradient is 0."""
    generator = torch.Generator().manual_seed(4)
    old_mean = torch.randn(1, D, generator=generator)
    eps = torch.randn(1, D, generator=generator)
    s, c, clip_range = 0.05, 0.2, 1e-2
    std = torch.tensor([s])
    sample = old_mean + s * eps
    mean = (old_mean + c * eps).requires_grad_(True)
    log_prob, old_log_prob = gaussian_log_prob(sample, mean, std), gaussian_log_prob(sample, old_mean, std)
    advantage = torch.tensor([1.0])
    raw = ppo_clip_loss(log_prob, old_log_prob, advantage, clip_range)
    normalization = RatioNormalization(mean_drift(mean, old_mean), std)
    guarded = ppo_clip_loss(log_prob, old_log_prob, advantage, clip_range, normalization)
    m = eps.pow(2).mean()
    torch.testing.assert_close(raw.ratio, torch.exp(c * m / s - c**2 * m / (2 * s**2)).view(1))
    torch.testing.assert_close(guarded.ratio, torch.exp(c * m).view(1))
    assert raw.ratio.item() < 1 and not raw.clipped.item()
    assert guarded.ratio.item() > 1 + clip_range and guarded.clipped.item()
    guarded.loss.backward()
    assert torch.count_nonzero(mean.grad) == 0


def test_step_weights_are_the_inverse_intervals_over_t():
    uniform = torch.linspace(1, 0, 9)
    start, length = torch.tensor([0, 3, 6, 2]), torch.tensor([1, 1, 2, 3])
    torch.testing.assert_close(step_weights(uniform, start, length), 1 / length.float())
    sigmas = shifted_sigmas(16, 3.0).float()
    expected = 1 / (16 * (sigmas[start] - sigmas[start + length]))
    torch.testing.assert_close(step_weights(sigmas, start, length), expected)


def test_step_weights_give_every_sde_step_the_same_gradient_per_unit_of_velocity():
    """Flow-GRPO's SDE mean moves by d (1 + a^2 / 2) per unit of velocity (d = s' - s): on-policy, the weighted
    normalized loss has dL/dv = A (1 + a^2 / 2) eps / (T D) at every step and merge length; unweighted it does
    not."""
    generator = torch.Generator().manual_seed(5)
    sigmas, noise_level, advantage = shifted_sigmas(16, 3.0).float(), 0.7, torch.tensor([1.5])
    latents, velocity, eps = (torch.randn(1, D, generator=generator) for _ in range(3))
    gradients = {}
    for start, length in [(1, 1), (4, 1), (8, 2), (13, 1), (14, 1)]:
        for weighted in (False, True):
            v = velocity.clone().requires_grad_(True)
            mean, std = sde_mean_std(latents, v, sigmas, start, length, noise_level)
            sample = mean.detach() + std * eps
            log_prob = gaussian_log_prob(sample, mean, std)
            normalization = RatioNormalization(mean_drift(mean, mean.detach()), std)
            weights = step_weights(sigmas, torch.tensor([start]), torch.tensor([length])) if weighted else None
            ppo_clip_loss(log_prob, log_prob.detach(), advantage, 1e-4, normalization, weights).loss.backward()
            gradients[start, weighted] = v.grad
    expected = advantage * (1 + noise_level**2 / 2) * eps / (16 * D)
    for (_, weighted), gradient in gradients.items():
        if weighted:
            torch.testing.assert_close(gradient, expected, rtol=1e-4, atol=1e-9)
    norms = [gradient.norm().item() for (_, weighted), gradient in gradients.items() if not weighted]
    assert max(norms) > 2 * min(norms)


def test_bad_values_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="ratio_normalization='yes'.*must be bool. Pass True or False"):
        EGRPOConfig(output_dir="unused", ratio_normalization="yes")
    with pytest.raises(ValueError, match="step_reweighting=True is not allowed.*set ratio_normalization=True"):
        EGRPOConfig(output_dir="unused", step_reweighting=True)
    for overrides in (dict(algorithm="dance-grpo"), dict(sde_type="cps", noise_level=0.5)):
        with pytest.raises(ValueError, match="step_reweighting=True is not allowed with.*Leave step_reweighting off"):
            EGRPOConfig(output_dir="unused", ratio_normalization=True, step_reweighting=True, **overrides)
    config = EGRPOConfig(output_dir="unused")
    assert config.ratio_normalization is False and config.step_reweighting is False


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_is_on_policy_and_trains_with_ratio_normalization(tmp_path, monkeypatch, algorithm):
    """Every loss call gets the normalization (and the step weights, where allowed); the first optimizer step's
    drifts are exactly 0 and its normalized ratios exactly 1; later phases see a moved mean; gradients flow. E-GRPO
    merges two intervals per trained step (``merge=2``)."""
    drifts = []

    def spying_loss(*args):
        drifts.append(args[4].mean_drift.detach().clone())
        assert (args[5] is not None) == reweighted
        return ppo_clip_loss(*args)

    monkeypatch.setattr(trainer_module, "ppo_clip_loss", spying_loss)
    reweighted = algorithm != "dance-grpo"  # step_reweighting: Flow-GRPO's SDE only
    trainer = tiny_trainer(
        tmp_path,
        algorithm=algorithm,
        ratio_normalization=True,
        step_reweighting=reweighted,
        max_steps=1,
        merge=2,
        mix_window_size=3,
    )
    if algorithm == "e-grpo":
        assert {step.length for step in trainer.strategy.merge_plan} == {2}
    metrics = trainer.step()
    assert metrics["ratio/on_policy_max_abs_dev"] == 0
    assert torch.equal(drifts[0], torch.zeros_like(drifts[0]))
    assert max(drift.max().item() for drift in drifts) > 0  # a later phase saw the policy move
    assert metrics["grad_norm"] > 0 and math.isfinite(metrics["loss"])
    assert "time/recompute_log_probs" in metrics  # the pre-pass recorded the old means


def test_ratio_normalization_resumes_exactly(tmp_path):
    """Neither keeps state across iterations (the old means are recorded anew each update): resuming from a
    checkpoint reproduces the uninterrupted run."""
    keys = ["loss", "reward/weighted_mean", "grad_norm", "ratio/max"]
    options = dict(algorithm="flow-grpo", ratio_normalization=True, step_reweighting=True, max_steps=3)
    uninterrupted = tiny_trainer(tmp_path / "a", save_steps=1, **options).train().log_history
    checkpoint = str(tmp_path / "a" / "checkpoint-1")
    resumed = tiny_trainer(tmp_path / "b", resume_from_checkpoint=checkpoint, **options).train().log_history
    for key in keys:
        assert [row[key] for row in resumed[1:]] == [row[key] for row in uninterrupted[1:]], key
