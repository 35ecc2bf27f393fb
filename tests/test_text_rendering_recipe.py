"""The text-rendering recipe (``examples/recipes/flux_dev_text_rendering.yaml``) and its prompt set
(``examples/prompts/``): the recipe parses and states the merge plan and cost of its schedule, its documented
commands parse, and every prompt quotes one short text that OCRReward reads as its target, test texts held out."""

import importlib.util
import os
import re
import shlex
import sys

import pytest

from families import FAMILIES, check_recipe_states_its_merge_plan
from trl_flow_egrpo.commands import evaluate
from trl_flow_egrpo.commands.train import ScriptArguments
from trl_flow_egrpo.data import load_prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = os.path.join(REPO, "examples", "prompts")
RECIPE = "flux_dev_text_rendering.yaml"
QUOTED_TEXT = re.compile(r'[^"]*"([A-Za-z0-9]+(?: [A-Za-z0-9]+){0,3})"[^"]*')
"""A prompt with exactly one double-quoted span of 1-4 words of ASCII letters and digits (the span captured)."""


def prompt_file(split: str) -> list[str]:
    """The lines of ``examples/prompts/text_rendering_<split>.txt``."""
    with open(os.path.join(PROMPTS, f"text_rendering_{split}.txt"), encoding="utf-8") as handle:
        return handle.read().splitlines()


@pytest.fixture(scope="module")
def generator():
    """``examples/prompts/make_text_rendering_prompts.py``, which writes the prompt files."""
    path = os.path.join(PROMPTS, "make_text_rendering_prompts.py")
    spec = importlib.util.spec_from_file_location("make_text_rendering_prompts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_states_the_merge_plan_and_cost_of_its_schedule():
    script_args, config, plan, text = check_recipe_states_its_merge_plan(FAMILIES["flux"], RECIPE, ScriptArguments)
    assert script_args.model_name_or_path == "black-forest-labs/FLUX.1-dev" and config.use_peft
    assert script_args.reward_funcs == ["ocr"] and config.beta == 0
    # The OCR reads every branch and every anchor of an iteration.
    images = len(plan) * config.num_generations + config.prompts_per_device
    assert f"and {images} images read by the OCR per prompt" in text.replace("\n# ", " ")
    train, test = (
        load_prompts(os.path.join(REPO, name)) for name in (script_args.dataset_name, script_args.eval_dataset_name)
    )
    assert f"{len(train)} training and {len(test)} test prompts" in text.replace("\n# ", " ")
    assert f"score base vs trained on the {len(test)} test prompts" in text
    assert script_args.num_eval_prompts == 0 and config.eval_steps > 0  # every test prompt is evaluated
    # Each T5 (sentencepiece) token covers at least one character of the prompt with its leading word-start mark;
    # then the end token: no prompt is truncated.
    longest = max(len(prompt) for prompt in prompt_file("train") + prompt_file("test"))
    assert longest + 2 <= config.max_sequence_length
    assert f"at most {longest} characters, so at most {longest + 2} T5 tokens" in text


def documented_command(lines: list[str], program: str) -> list[str]:
    """The options of the first command among ``lines`` that runs ``program``, its continuation lines joined."""
    lines = [line.strip() for line in lines]
    start = next(i for i, line in enumerate(lines) if program in line)
    command = lines[start]
    while command.endswith("\\"):
        start += 1
        command = command.removesuffix("\\") + " " + lines[start]
    words = shlex.split(command)
    return words[words.index(program) + 1 :]


def read(*path: str) -> str:
    """The text of the repository's file ``path``."""
    with open(os.path.join(REPO, *path), encoding="utf-8") as handle:
        return handle.read()


def test_documented_commands_parse_and_the_docs_show_the_recipes():
    header = [line.removeprefix("#") for line in read("examples", "recipes", RECIPE).splitlines() if line[:1] == "#"]
    section = read("docs", "rewards.md").split("### Training a text renderer", 1)[1].split("\n## ", 1)[0]
    for program in ("examples/hpd.py", "examples/evaluate.py"):
        assert documented_command(section.splitlines(), program) == documented_command(header, program)
    assert documented_command(header, "examples/hpd.py") == ["--config", f"examples/recipes/{RECIPE}"]
    eval_args, config = evaluate.parse_arguments(
        [
            os.path.join(REPO, word) if word.startswith("examples/") else word
            for word in documented_command(header, "examples/evaluate.py")
        ]
    )
    assert eval_args.metrics == ["ocr", "hps"] and eval_args.num_test_prompts == 0
    assert eval_args.trained_model == config.output_dir  # the recipe's output is what gets scored
    assert os.path.samefile(eval_args.test_dataset_name, os.path.join(PROMPTS, "text_rendering_test.txt"))
    train, test = len(prompt_file("train")), len(prompt_file("test"))
    assert f"{train} training and {test} test prompts" in " ".join(section.split())
    readme = " ".join(read("examples", "prompts", "README.md").split())
    assert f"`text_rendering_train.txt` ({train} prompts) and `text_rendering_test.txt` ({test} prompts)" in readme


def test_prompt_files_quote_one_short_text_each_test_texts_held_out(generator):
    texts = {}
    for split in ("train", "test"):
        prompts = prompt_file(split)
        assert len(set(prompts)) == len(prompts) and all(prompts)  # no duplicate, no blank line
        bad = [prompt for prompt in prompts if not QUOTED_TEXT.fullmatch(prompt)]
        assert bad == []
        texts[split] = {QUOTED_TEXT.fullmatch(prompt).group(1).lower() for prompt in prompts}
    assert len(prompt_file("train")) >= 200 and len(prompt_file("test")) == generator.NUM_TEST_TEXTS
    assert texts["train"].isdisjoint(texts["test"])
    assert texts["train"] | texts["test"] == {text.lower() for text in generator.TEXTS}


def test_generator_rewrites_the_shipped_files(generator):
    assert generator.make_prompts() == (prompt_file("train"), prompt_file("test"))
    assert generator.make_prompts(seed=generator.SEED + 1) != (prompt_file("train"), prompt_file("test"))


@pytest.mark.parametrize(
    "texts, scenes, error",
    [
        (("Open", "Five words are too many"), ('a sign "{text}"',), "'Five words are too many': use 1 to 4 words"),
        (("Open", "Caf\u00e9"), ('a sign "{text}"',), "'Caf\u00e9': use 1 to 4 words of ASCII"),
        (("Open", "OPEN"), ('a sign "{text}"',), "'OPEN' appears twice"),
        (("Open",), ('a "big" sign "{text}"',), "needs exactly one quoted"),
    ],
)
def test_generator_refuses_texts_and_scenes_that_break_the_rules(generator, texts, scenes, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        generator.check_inputs(texts, scenes)


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="rapidocr-onnxruntime declares Python < 3.13")
def test_ocr_reward_reads_every_prompts_target():
    from trl_flow_egrpo.rewards import OCRReward

    reward = OCRReward(device="cpu")
    for split in ("train", "test"):
        prompts = prompt_file(split)
        expected = [QUOTED_TEXT.fullmatch(prompt).group(1) for prompt in prompts]
        assert reward.targets(prompts, {}) == expected
