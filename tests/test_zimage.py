"""Z-Image specifics, on the tiny offline Z-Image pipeline: guidance defaults to the pipeline's and 0 turns it off
(Z-Image-Turbo), the schedule is the pipeline's to the bit, prompt embeddings do not depend on their batch, and
guidance scales and patch sizes the pipeline cannot sample with are clear errors. The checks every family shares
(the anchor is the pipeline's own sample with classifier-free guidance and a negative prompt, and without guidance;
on-policy ratios; training; LoRA round trip reaching every block kind; clear errors; the recipe's merge plan) are
in ``test_conformance.py``."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from families import NEGATIVE, ZIMAGE
from trl_flow_egrpo.tiny import build_tiny_zimage_pipeline


def test_guidance_defaults_to_the_pipelines_and_zero_turns_it_off():
    pipe = build_tiny_zimage_pipeline()
    adapter = ZIMAGE.adapter(pipe)
    assert adapter.guidance_scale == 5.0 and adapter.do_classifier_free_guidance and adapter.family == "zimage"
    assert not ZIMAGE.adapter(pipe, guidance_scale=0.0).do_classifier_free_guidance


@pytest.mark.parametrize("num_steps", [4, 6, 9, 28, 50])
def test_schedule_is_the_pipelines_to_the_bit(num_steps):
    # ZImagePipeline's grid is torch.linspace in float32; the float64 numpy grid of the other families differs
    # from it by one ulp at 6, 28 and 50 steps, so the adapter must build its schedule from the pipeline's grid.
    pipe = build_tiny_zimage_pipeline()
    for scheduler in (pipe.scheduler, FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)):
        pipe.scheduler = scheduler
        schedule = ZIMAGE.adapter(pipe, width=64).schedule(num_steps, shift=None)
        ZIMAGE.sample(
            pipe,
            ZIMAGE.adapter(pipe, width=64, guidance_scale=0.0),
            ["a cat"],
            torch.zeros(1, 16, ZIMAGE.size // 8, 64 // 8),
            num_steps,
            "latent",
        )
        torch.testing.assert_close(schedule.sigmas, pipe.scheduler.sigmas.float(), rtol=0, atol=0)
        torch.testing.assert_close(schedule.timesteps, pipe.scheduler.timesteps.float(), rtol=0, atol=0)
    static = ZIMAGE.adapter(pipe).schedule(num_steps, shift=2.0)
    unshifted = 1 - 1 / num_steps
    assert float(static.sigmas[1]) == pytest.approx(2.0 * unshifted / (1 + unshifted), abs=1e-6)


@torch.no_grad()
def test_prompt_embeddings_do_not_depend_on_the_batch():
    adapter = ZIMAGE.adapter(build_tiny_zimage_pipeline(), negative_prompt=NEGATIVE)
    prompts = ["a rose", "a bowl of cherries on a wooden table"]
    together = adapter.encode_prompts(prompts)
    assert prompts == ["a rose", "a bowl of cherries on a wooden table"]  # the pipeline rewrites its argument
    alone = adapter.encode_prompts(["a rose"])
    for name, tensor in alone.items():
        assert tensor.shape[1] == ZIMAGE.sequence_length
        torch.testing.assert_close(together[name][:1], tensor, rtol=0, atol=1e-6)
    lengths = together["prompt_embeds_mask"].sum(1).tolist()
    assert lengths[0] < lengths[1] <= ZIMAGE.sequence_length
    assert together["prompt_embeds"][0, lengths[0] :].abs().max() == 0  # padding is zeros, masked out


def test_bad_guidance_and_patch_size_are_clear_errors():
    pipe = build_tiny_zimage_pipeline()
    with pytest.raises(
        ValueError,
        match=r"guidance_scale=-1.0: ZImagePipeline's classifier-free guidance scale must be >= 0",
    ):
        ZIMAGE.adapter(pipe, guidance_scale=-1.0)
    pipe.transformer.register_to_config(all_patch_size=(1,))
    with pytest.raises(ValueError, match=r"patch sizes \(1,\); ZImagePipeline samples with 2x2 patches"):
        ZIMAGE.adapter(pipe)
