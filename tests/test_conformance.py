"""The checks every pipeline family must pass, run on each entry of the registry in ``tests/families.py`` (FLUX.1,
SD3, FLUX.2 [dev], FLUX.2 [klein], Qwen-Image, Z-Image, Wan): the adapter is registered and draws the pipeline's
noise, the anchor trajectory is the pipeline's own ``__call__`` sample (with and without classifier-free guidance
where the family has it), on-policy ratios are 1, training raises a reward, the saved LoRA loads into a fresh
pipeline and reproduces the trained samples, the model card's snippet reproduces them too, bad input is a clear
error, and the recipe states its schedule's merge plan. Family-specific behaviour is tested in each family's own
file."""

import importlib.util
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from card_snippet import check_card_snippet_reproduces_samples
from families import EVAL_PROMPTS, FAMILIES, NEGATIVE, check_recipe_states_its_merge_plan
from helpers import assert_training_raises_the_reward
from trl_flow_egrpo import plan_merges
from trl_flow_egrpo.rollout import sample_ode, sample_rollouts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVERY_FAMILY = pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())
PARITY_PROMPTS = ["a red apple", "a fire truck on a bridge at night"]  # different lengths: padding is masked


def uses_cfg(adapter) -> bool:
    """Whether ``adapter`` runs a classifier-free guidance pass (families without one have no such attribute)."""
    return getattr(adapter, "do_classifier_free_guidance", False)


@torch.no_grad()
@EVERY_FAMILY
def test_adapter_is_registered_and_draws_the_pipelines_noise(family):
    pipe = family.build()
    adapter = family.adapter(pipe, width=2 * family.size)
    assert type(adapter) is family.adapter_class
    assert adapter.guidance_scale == family.adapter_class.default_guidance_scale == family.default_guidance_scale
    noise = adapter.initial_noise(3, torch.Generator().manual_seed(7))
    assert noise.shape == (3, *family.noise_shape) and noise.dtype == torch.float32
    expected = family.pipeline_noise(pipe, adapter, 3, torch.Generator().manual_seed(7))
    torch.testing.assert_close(family.noise_as_drawn(pipe, adapter, noise), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family, case", [param for family in FAMILIES.values() for param in family.cases("parity")])
def test_anchor_trajectory_is_the_pipelines_sample(family, case):
    pipe = family.build(**case.pipeline_kwargs)
    adapter = family.adapter(pipe, **case.adapter_kwargs())
    assert uses_cfg(adapter) == case.cfg
    num_steps = family.parity_steps
    schedule = adapter.schedule(num_steps, case.shift)
    if case.shift is not None:  # the pipeline must sample with the same static shift
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, shift=case.shift, use_dynamic_shifting=False
        )
    noise = adapter.initial_noise(len(PARITY_PROMPTS), torch.Generator().manual_seed(0))
    conditioning = family.encode(adapter, PARITY_PROMPTS)
    plan = plan_merges(schedule.sigmas, 0.7, 2.2, 3, "adaptive", "overlap")
    # Batches of 5 rows mix anchors and branches at different timesteps, as in training.
    rollouts = sample_rollouts(
        adapter,
        pipe.transformer,
        schedule,
        plan,
        conditioning,
        noise,
        num_generations=2,
        noise_level=0.7,
        generator=torch.Generator().manual_seed(1),
        batch_size=5,
    )

    tolerance = dict(rtol=family.parity_rtol, atol=family.parity_tolerance)
    latents = family.sample(pipe, adapter, PARITY_PROMPTS, noise, num_steps, "latent")
    torch.testing.assert_close(schedule.sigmas, pipe.scheduler.sigmas.float(), rtol=0, atol=0)
    torch.testing.assert_close(family.latents_as_returned(pipe, adapter, rollouts.anchor_latents), latents, **tolerance)
    images = family.sample(pipe, adapter, PARITY_PROMPTS, noise, num_steps, "pt")
    torch.testing.assert_close(rollouts.anchor_images, images, **tolerance)
    assert rollouts.images.shape == (len(PARITY_PROMPTS) * len(plan), 2, *images.shape[1:])
    # The plain ODE sampler (evaluation's) follows the same trajectory, one prompt per call.
    ode = sample_ode(adapter, pipe.transformer, schedule, conditioning, noise, batch_size=1)
    torch.testing.assert_close(family.latents_as_returned(pipe, adapter, ode), latents, **tolerance)
    # The comparison can fail: the branches left the anchor, and the guidance (or its absence) changes the sample.
    assert (rollouts.images - rollouts.anchor_images[rollouts.group_prompt][:, None]).abs().max() > 1e-3
    other = family.adapter(pipe, guidance_scale=adapter.guidance_scale + 2, negative_prompt=case.negative_prompt)
    changed = (family.sample(pipe, other, PARITY_PROMPTS, noise, num_steps, "pt") - images).abs().max()
    assert (changed > 1e-3) == case.guidance_matters


@pytest.mark.parametrize("family, case", [param for family in FAMILIES.values() for param in family.cases("on_policy")])
def test_on_policy_ratios_are_one(tmp_path, family, case):
    # Training micro-batches (3 groups) differ from sampling batches (7 rows), and so do their prompts' lengths:
    # ratios must still be 1.
    trainer = family.trainer(tmp_path, sampling=case, rollout_batch_size=7, per_device_train_batch_size=3)
    assert uses_cfg(trainer.adapter) == case.cfg
    metrics = trainer.step()
    assert metrics["ratio/on_policy_max_abs_dev"] < 1e-5
    if trainer.config.algorithm == "e-grpo":
        evaluations = trainer.config.prompts_per_device * trainer.evaluations_per_prompt()
        assert metrics["trajectory_evaluations"] == evaluations
        assert metrics["transformer_rows"] == (2 if case.cfg else 1) * evaluations  # CFG: two rows per evaluation
    assert metrics["grad_norm"] > 0  # the LoRA gets a gradient through the (guided) velocity


@EVERY_FAMILY
def test_training_raises_the_reward(tmp_path, family):
    assert_training_raises_the_reward(
        family.trainer(tmp_path, **family.training),
        EVAL_PROMPTS,
        reward=family.reward(),
        images=family.images(EVAL_PROMPTS),
    )


@EVERY_FAMILY
def test_saved_lora_loads_into_a_fresh_pipeline(tmp_path, family):
    # lora_alpha != r: the loaded LoRA must keep its scale; with guidance, the CFG pair uses the LoRA too.
    case = family.lora
    trainer = family.trainer(tmp_path, sampling=case, lora_alpha=16, max_steps=2, learning_rate=5e-2)
    assert uses_cfg(trainer.adapter) == case.cfg
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    saved = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    for module in family.lora_modules:
        assert f"transformer.{module}.lora_A.weight" in saved
    prompts = EVAL_PROMPTS[:2]
    trained = trainer.sample_images(prompts, seed=5, images=family.images(prompts))  # prompt i from seed 5 + i
    noise = torch.cat(
        [trainer.adapter.initial_noise(1, torch.Generator().manual_seed(5 + i)) for i in range(len(prompts))]
    )
    num_steps = trainer.config.num_inference_steps

    fresh = family.build(seed=0, **case.pipeline_kwargs)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    loaded = family.sample(fresh, trainer.adapter, prompts, noise, num_steps, "pt")
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-5)
    base = family.sample(family.build(seed=0, **case.pipeline_kwargs), trainer.adapter, prompts, noise, num_steps, "pt")
    assert (trained - base).abs().max() > 1e-3  # the LoRA changed the model, so the comparison can fail


@pytest.fixture
def one_thread():
    """One torch thread: many times faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_family_has_a_model_card_case():
    assert [family.id for family in FAMILIES.values() if not family.card] == []


@pytest.mark.parametrize(
    "family, overrides",
    [
        pytest.param(family, overrides, id=f"{family.id}-{case}")
        for family in FAMILIES.values()
        for case, overrides in family.card
    ],
)
def test_card_snippet_reproduces_the_trainers_samples(family, overrides, tmp_path, monkeypatch, one_thread):
    # The card's own Python block, executed with the two repository ids replaced by local folders.
    check_card_snippet_reproduces_samples(family.build, overrides, tmp_path, monkeypatch)


@EVERY_FAMILY
def test_bad_input_is_a_clear_error(tmp_path, family):
    name = family.adapter_class.__name__.removesuffix("Adapter")
    with pytest.raises(
        ValueError,
        match=f"height=40: {name} needs image sizes that are positive multiples of 16 .*"
        r"Set EGRPOConfig.height to e.g. 32 or 48\.",
    ):
        family.adapter(family.build(), height=40)
    # A negative prompt the pipeline has no pass for would be silently ignored.
    for case, reason in family.negative_refusals:
        assert case.negative_prompt == NEGATIVE
        with pytest.raises(ValueError, match=re.escape(f"negative_prompt={NEGATIVE!r}") + ".*" + reason):
            family.trainer(tmp_path, sampling=case)


@pytest.fixture(scope="module")
def hpd():
    """``examples/hpd.py``, whose argument classes parse the recipes."""
    spec = importlib.util.spec_from_file_location("hpd", os.path.join(REPO, "examples", "hpd.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", [family for family in FAMILIES.values() if family.recipe], ids=lambda f: f.id)
def test_recipe_states_the_merge_plan_of_its_schedule(hpd, family):
    check_recipe_states_its_merge_plan(family, family.recipe, hpd.ScriptArguments)
