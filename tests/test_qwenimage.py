"""Qwen-Image specifics, on the tiny offline Qwen-Image pipeline: the tiny tokenizer splits the prompt template as
the real one does, the schedule ends at the scheduler's terminal shift, prompt embeddings do not depend on their
batch, and a guidance-embedding transformer is refused. The checks every family shares (the anchor is the
pipeline's own sample with true classifier-free guidance and its norm rescale, and without guidance; on-policy
ratios; training; LoRA round trip; clear errors; the recipe's merge plan) are in ``test_conformance.py``."""

import pytest
import torch

from families import NEGATIVE, QWENIMAGE
from trl_flow_egrpo.tiny import build_tiny_qwenimage_pipeline


def test_tiny_tokenizer_splits_the_prompt_template_like_the_real_one():
    # The pipeline drops the template's tokens by count: it must drop exactly the template.
    pipe = build_tiny_qwenimage_pipeline()
    ids = pipe.tokenizer(pipe.prompt_template_encode.format("a cat"))["input_ids"]
    dropped = pipe.tokenizer.decode(ids[: pipe.prompt_template_encode_start_idx])
    assert dropped == pipe.prompt_template_encode.split("{}")[0]


def test_schedule_ends_at_the_terminal_shift():
    # The conformance suite checks the schedule is the pipeline's; this pins the scheduler's shift_terminal in it.
    schedule = QWENIMAGE.adapter(build_tiny_qwenimage_pipeline()).schedule(6, shift=None)
    assert abs(float(schedule.sigmas[-2]) - 0.02) < 1e-6


def test_guidance_embedding_transformer_is_a_clear_error():
    pipe = build_tiny_qwenimage_pipeline()
    pipe.transformer.register_to_config(guidance_embeds=True)
    with pytest.raises(ValueError, match="guidance_embeds=True .* true classifier-free guidance only"):
        QWENIMAGE.adapter(pipe)


@torch.no_grad()
def test_prompt_embeddings_do_not_depend_on_the_batch():
    # The pipeline pads to the batch's longest prompt; the adapter's rows must not change with their company.
    adapter = QWENIMAGE.adapter(build_tiny_qwenimage_pipeline(), negative_prompt=NEGATIVE)
    alone = adapter.encode_prompts(["a rose"])
    together = adapter.encode_prompts(["a rose", "a bowl of cherries on a wooden table"])
    for name, tensor in alone.items():
        assert tensor.shape[1] == QWENIMAGE.sequence_length
        torch.testing.assert_close(together[name][:1], tensor, rtol=0, atol=1e-6)
    assert together["prompt_embeds_mask"].sum(1).tolist()[0] < together["prompt_embeds_mask"].sum(1).tolist()[1]
