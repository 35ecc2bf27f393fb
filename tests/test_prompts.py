"""Prompt encoding: the on-disk embedding cache and text-encoder offloading."""

import os

import pytest
import torch

from helpers import PROMPTS, tiny_trainer
from trl_flow_egrpo.adapters import get_adapter
from trl_flow_egrpo.prompts import PromptEncoder
from trl_flow_egrpo.tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline


def _adapter(pipeline=None, **kwargs):
    return get_adapter(
        pipeline or build_tiny_flux_pipeline(seed=0), height=64, width=64, max_sequence_length=32, **kwargs
    )


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_cached_embeddings_equal_fresh_ones_and_are_encoded_once(tmp_path):
    adapter = _adapter()
    encoder = PromptEncoder(adapter, "cpu", cache_dir=str(tmp_path))
    prompts = ["a red apple", "a cat", "a red apple"]
    first = encoder(prompts)
    assert encoder.num_encoded == 2  # the repeated prompt is encoded once
    again = PromptEncoder(adapter, "cpu", cache_dir=str(tmp_path))  # a new run, same model
    second = again(prompts)
    assert again.num_encoded == 0
    _assert_same(first, second)
    _assert_same(second, adapter.encode_prompts(prompts))


def test_cache_keys_separate_models_and_settings(tmp_path):
    keys = {
        PromptEncoder(_adapter(), "cpu").model_key(),
        PromptEncoder(_adapter(build_tiny_flux_pipeline(seed=1)), "cpu").model_key(),  # other weights
        PromptEncoder(
            get_adapter(build_tiny_flux_pipeline(seed=0), height=64, width=64, max_sequence_length=16), "cpu"
        ).model_key(),
        PromptEncoder(_adapter(build_tiny_sd3_pipeline()), "cpu").model_key(),
        PromptEncoder(_adapter(build_tiny_sd3_pipeline(), negative_prompt="blurry"), "cpu").model_key(),
    }
    assert len(keys) == 5
    assert PromptEncoder(_adapter(), "cpu").model_key() == PromptEncoder(_adapter(), "cpu").model_key()


def test_a_damaged_cache_entry_is_encoded_again(tmp_path):
    encoder = PromptEncoder(_adapter(), "cpu", cache_dir=str(tmp_path))
    reference = encoder(["a cat"])
    (path,) = [os.path.join(root, name) for root, _, names in os.walk(tmp_path) for name in names]
    with open(path, "r+b") as handle:
        handle.truncate(10)
    _assert_same(encoder(["a cat"]), reference)
    assert encoder.num_encoded == 2


def test_warm_precomputes_a_dataset(tmp_path):
    encoder = PromptEncoder(_adapter(), "cpu", cache_dir=str(tmp_path))
    assert encoder.warm(PROMPTS + PROMPTS[:2], batch_size=4) == len(PROMPTS)
    assert encoder.warm(PROMPTS) == 0
    with pytest.raises(ValueError, match="needs a cache_dir"):
        PromptEncoder(_adapter(), "cpu").warm(PROMPTS)


def test_offloaded_encoders_visit_the_device_only_to_encode():
    encoder = PromptEncoder(_adapter(), "cpu", offload=True)
    assert not encoder.offload  # nothing to offload from on a CPU run
    moves = []
    encoder.offload, encoder._move_encoders = True, moves.append
    encoder(["a cat"])
    assert moves == [encoder.device, "cpu"]
    encoder.adapter.encode_prompts = lambda prompts: 1 / 0
    with pytest.raises(ZeroDivisionError):
        encoder(["a dog"])
    assert moves[-1] == "cpu"  # back on the CPU even when encoding fails


def test_training_with_the_cache_is_identical(tmp_path):
    plain = tiny_trainer(tmp_path / "plain", max_steps=2).train().log_history
    cached_trainer = tiny_trainer(tmp_path / "cached", max_steps=2, prompt_cache_dir=str(tmp_path / "cache"))
    cached = cached_trainer.train().log_history
    for key in ("loss", "reward/weighted_mean", "grad_norm"):
        assert [row[key] for row in cached] == [row[key] for row in plain], key
    assert cached_trainer.prompt_encoder.num_encoded == 4  # 2 iterations x 2 prompts, each encoded once
