"""Configuration that would silently damage a run is refused at construction (data: at the trainer's init).

Issue 18, section 7: wrong types in the Python API and in YAML, non-finite guidance, overflowing reward weights,
a zero LoRA scale, a negative prompt FLUX.1 ignores, fp16 that accelerate drops on a CPU, prompts that are not
strings, a prompt cache that is a file, and a reward whose output lives on the meta device.
"""

import dataclasses
import importlib.util
import math
import os
import re
import types
import typing

import numpy as np
import pytest
import torch
from datasets import Dataset

from helpers import PROMPTS, tiny_trainer
from trl_flow_egrpo import EGRPOConfig
from trl_flow_egrpo.advantages import group_advantages
from trl_flow_egrpo.config import REWARD_WEIGHT_SUM_LIMIT, check_mixed_precision_on_device
from trl_flow_egrpo.scoring import call_reward

ROOT = os.path.join(os.path.dirname(__file__), "..")

# ------------------------------------------------------------------------------------------- types (Python API)


@pytest.mark.parametrize(
    "field, value, expected, hint",
    [
        ("num_generations", 4.5, "int", "Pass a whole number"),
        ("num_generations", "4", "int", "Pass the number itself, not a string: num_generations=4"),
        ("num_generations", True, "int", ""),
        ("learning_rate", "1e-4", "float", r"learning_rate=0.0001\. In YAML write 1.0e-4"),
        ("compile_transformer", "no", "bool", "a non-empty string such as 'no' is truthy"),
        ("use_peft", 1, "bool", ""),
        ("mixed_precision", False, "str", 'no, off and false as the boolean False.*mixed_precision: "no"'),
        ("num_frames", 8.0, "int or None", ""),
        ("reward_weights", {"hps": 1.0}, "list of float or None", ""),
        ("reward_weights", ["1.0"], "list of float or None", ""),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_field_value_type_and_expected_type(field, value, expected, hint):
    stated = f"{field}={value!r} ({type(value).__name__}) is not allowed: {field} must be {expected}."
    message = "^" + re.escape(stated) + ".*" + hint
    with pytest.raises(ValueError, match=message):
        EGRPOConfig(**{field: value})


def _annotation_members(annotation) -> tuple:
    """The alternatives of ``X | None``, or ``(annotation,)``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


FIELD_TYPES = typing.get_type_hints(EGRPOConfig)
NUMBER_FIELDS = [
    f.name for f in dataclasses.fields(EGRPOConfig) if {int, float} & set(_annotation_members(FIELD_TYPES[f.name]))
]
BOOL_FIELDS = [f.name for f in dataclasses.fields(EGRPOConfig) if bool in _annotation_members(FIELD_TYPES[f.name])]
TEXT_FIELDS = [
    f.name
    for f in dataclasses.fields(EGRPOConfig)
    if str in _annotation_members(FIELD_TYPES[f.name]) and f.name != "resume_from_checkpoint"
]


@pytest.mark.parametrize("field", NUMBER_FIELDS)
def test_every_number_field_refuses_a_string(field):
    with pytest.raises(ValueError, match=rf"^{field}='1' \(str\) is not allowed: {field} must be "):
        EGRPOConfig(**{field: "1"})


@pytest.mark.parametrize("field", BOOL_FIELDS)
def test_every_bool_field_refuses_a_truthy_string(field):
    with pytest.raises(ValueError, match=rf"^{field}='no' \(str\) is not allowed: {field} must be bool"):
        EGRPOConfig(**{field: "no"})


@pytest.mark.parametrize("field", TEXT_FIELDS)
def test_every_text_field_refuses_a_yaml_boolean_with_the_quoting_fix(field):
    with pytest.raises(ValueError, match=rf"^{field}=False \(bool\) is not allowed: .*quote the word you meant"):
        EGRPOConfig(**{field: False})


def test_the_type_sweeps_cover_the_config():
    # The sweeps above are derived from the annotations; this guards against a derivation that finds nothing.
    assert {"num_generations", "learning_rate", "guidance_scale"} <= set(NUMBER_FIELDS)
    assert {"compile_transformer", "use_peft"} <= set(BOOL_FIELDS)
    assert {"mixed_precision", "negative_prompt", "merge"} <= set(TEXT_FIELDS)


@pytest.mark.parametrize(
    "overrides, field, expected",
    [
        (dict(reward_weights=1.0), "reward_weights", [1.0]),
        (dict(reward_weights=(1, 2)), "reward_weights", [1.0, 2.0]),
        (dict(lora_target_modules="to_q"), "lora_target_modules", ["to_q"]),
        (dict(lora_target_modules=("to_q", "to_k")), "lora_target_modules", ["to_q", "to_k"]),
        (dict(learning_rate=1), "learning_rate", 1.0),
        (dict(num_generations=np.int64(4)), "num_generations", 4),
        (dict(merge=4), "merge", "4"),
        (dict(resume_from_checkpoint=True), "resume_from_checkpoint", "true"),
        (dict(resume_from_checkpoint=False), "resume_from_checkpoint", None),
    ],
)
def test_values_that_mean_one_thing_are_taken_as_the_field_type(overrides, field, expected):
    value = getattr(EGRPOConfig(**overrides), field)
    assert value == expected and type(value) is type(expected)


def test_a_scalar_target_module_is_one_module_not_its_letters(tmp_path):
    trainer = tiny_trainer(tmp_path, lora_target_modules="to_q", max_steps=1)
    parameters = [name for name, _ in trainer.model.named_parameters() if ".lora_A." in name]
    adapted = {name.split(".lora_A.")[0].rsplit(".", 1)[-1] for name in parameters}
    assert adapted == {"to_q"}


# ------------------------------------------------------------------------------------------------ values


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("guidance_scale", math.nan, "a finite number, or None"),
        ("guidance_scale", math.inf, "a finite number, or None"),
        ("guidance_scale", -math.inf, "a finite number, or None"),
        ("lora_alpha", 0, ">= 1 .*0 trains nothing"),
        ("lora_r", 0, ">= 1"),
        ("reward_weights", [math.inf, 1.0], "finite numbers"),
        ("reward_weights", [1e308, 1e308], "numbers whose absolute values sum to at most 1e\\+06.*overflow"),
        ("reward_weights", [0.0, 0.0], "weights that are not all 0"),
    ],
)
def test_damaging_values_are_refused_at_construction(field, value, allowed):
    stated = re.escape(f"{field}={value!r} is not allowed: {field} must be ")
    with pytest.raises(ValueError, match="^" + stated + allowed):
        EGRPOConfig(**{field: value})


@pytest.mark.parametrize("aggregation", ["sum", "advantage"])
def test_huge_reward_weights_are_refused_in_both_aggregations(aggregation):
    weights = [REWARD_WEIGHT_SUM_LIMIT, REWARD_WEIGHT_SUM_LIMIT]
    with pytest.raises(ValueError, match="reward_weights=.* must be numbers whose absolute values sum to at most"):
        EGRPOConfig(reward_weights=weights, reward_aggregation=aggregation)
    EGRPOConfig(reward_weights=[w / 2 for w in weights], reward_aggregation=aggregation)  # at the limit: accepted


def test_the_weight_limit_keeps_advantages_finite_where_huge_weights_make_nan():
    rewards = torch.rand(3, 4, 2, generator=torch.Generator().manual_seed(0)) * 1e32  # rewards up to 1e32
    at_limit = [REWARD_WEIGHT_SUM_LIMIT / 2] * 2
    for aggregation in ("sum", "advantage"):
        assert torch.isfinite(group_advantages(rewards, at_limit, aggregation)).all()
    # What the check prevents: [1e308, 1e308] is inf in float32, and "sum" turns it into NaN advantages.
    assert torch.isnan(group_advantages(rewards.clamp(max=1.0), [1e308, 1e308], "sum")).all()


def test_a_prompt_cache_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "cache"
    path.write_text("not a directory")
    with pytest.raises(ValueError, match=rf"^prompt_cache_dir='{path}' is not allowed: .* it is a file"):
        EGRPOConfig(prompt_cache_dir=str(path))
    EGRPOConfig(prompt_cache_dir=str(tmp_path / "new"))  # a directory that does not exist yet is fine
    EGRPOConfig(prompt_cache_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------ at the trainer


def test_a_negative_prompt_on_flux1_is_refused_naming_the_pipeline(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"negative_prompt='blurry' is not allowed with FluxPipeline: .*"
        r"silently ignored\. Set negative_prompt to ''.*SD3",
    ):
        tiny_trainer(tmp_path, negative_prompt="blurry")


def test_accelerate_drops_fp16_on_cpu_silently_but_keeps_bf16():
    """Why fp16 on a CPU is refused: accelerate turns its autocast off there without a word."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    computed = {}
    for precision in ("fp16", "bf16"):
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(cpu=True, mixed_precision=precision)
        with accelerator.autocast():
            computed[precision] = torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype
    assert computed == {"fp16": torch.float32, "bf16": torch.bfloat16}


def test_fp16_on_cpu_is_refused_at_trainer_init(tmp_path):
    with pytest.raises(ValueError, match=r"mixed_precision='fp16' is not allowed on a CPU: .*'bf16'.* or 'no'"):
        tiny_trainer(tmp_path, mixed_precision="fp16")
    check_mixed_precision_on_device("fp16", "cuda")  # a GPU autocasts fp16
    check_mixed_precision_on_device("bf16", "cpu")


@pytest.mark.parametrize(
    "dataset, role_and_row",
    [
        (Dataset.from_dict({"prompt": ["a rose", None, "a cat"]}), r"^train_dataset: .*'prompt' of row 1 is None"),
        (Dataset.from_dict({"prompt": [7, 8]}), r"^train_dataset: .*'prompt' of row 0 is 7 \(int\)"),
        (["a rose", "a cat", None], r"^train_dataset \(a list of prompts\): .*row 2 is None"),
        ([{"prompt": "a rose"}, {"prompt": 3}], r"^train_dataset: .*'prompt' of row 1 is 3 \(int\)"),
    ],
)
def test_prompts_that_are_not_strings_are_refused_at_trainer_init(tmp_path, dataset, role_and_row):
    with pytest.raises(ValueError, match=role_and_row + r".*not a string.*Every prompt must be a string"):
        tiny_trainer(tmp_path, dataset=dataset)


def test_eval_prompts_that_are_not_strings_are_named_as_eval_dataset(tmp_path):
    with pytest.raises(ValueError, match=r"^eval_dataset: .*row 1 is None"):
        tiny_trainer(tmp_path, eval_dataset=Dataset.from_dict({"prompt": ["a rose", None]}))


def test_a_reward_on_the_meta_device_is_named():
    def empty_model_reward(images, prompts, **columns):
        return torch.empty(len(images), device="meta")

    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^Reward 'empty_model_reward' returned a tensor on the meta device"):
        call_reward("empty_model_reward", empty_model_reward, images, PROMPTS[:2], {})


# -------------------------------------------------------------------------------- YAML through examples/hpd.py


def _parse_recipe(tmp_path, text: str) -> EGRPOConfig:
    """``text`` as a recipe through the parser examples/hpd.py uses (TrlParser, --config file)."""
    from trl import TrlParser

    spec = importlib.util.spec_from_file_location("example_hpd", os.path.join(ROOT, "examples", "hpd.py"))
    hpd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hpd)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    _, config = TrlParser((hpd.ScriptArguments, EGRPOConfig)).parse_args_and_config(args=["--config", str(recipe)])
    return config


@pytest.mark.parametrize(
    "yaml_text, field, expected",
    [
        ("reward_weights: 1.0\n", "reward_weights", [1.0]),
        ("lora_target_modules: to_q\n", "lora_target_modules", ["to_q"]),
        ("lora_target_modules: [to_q, to_k]\n", "lora_target_modules", ["to_q", "to_k"]),
        ('mixed_precision: "no"\n', "mixed_precision", "no"),
        ("merge: 4\n", "merge", "4"),
        ("resume_from_checkpoint: true\n", "resume_from_checkpoint", "true"),
        ("learning_rate: 1e-4\n", "learning_rate", 1e-4),  # text to YAML 1.1; the parser converts it
    ],
)
def test_yaml_values_reach_the_config_as_meant(tmp_path, yaml_text, field, expected):
    value = getattr(_parse_recipe(tmp_path, yaml_text), field)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("mixed_precision: no\n", r'mixed_precision=False \(bool\) is not allowed: .*quote the word you meant.*"no"'),
        ("mixed_precision: off\n", r"mixed_precision=False \(bool\) is not allowed: .*no, off and false"),
        ("num_generations: 4.5\n", r"num_generations=4.5 \(float\) is not allowed: num_generations must be int"),
        ("guidance_scale: .nan\n", r"guidance_scale=nan is not allowed"),
        ("reward_weights: [1.0e+308, 1.0e+308]\n", r"reward_weights=\[1e\+308, 1e\+308\] is not allowed"),
    ],
)
def test_damaging_yaml_values_are_refused_with_the_fix(tmp_path, yaml_text, message):
    with pytest.raises(ValueError, match=message):
        _parse_recipe(tmp_path, yaml_text)


def test_a_negative_prompt_without_guidance_is_refused(tmp_path):
    from trl_flow_egrpo.tiny import build_tiny_sd3_pipeline

    with pytest.raises(ValueError, match=r"negative_prompt='blurry' would never be used: classifier-free guidance "):
        tiny_trainer(tmp_path, pipeline=build_tiny_sd3_pipeline(), negative_prompt="blurry", guidance_scale=1.0)
