"""The ``trl-flow-egrpo`` command: ``train`` and ``evaluate`` run recipes end to end, ``--help`` and ``--version``
answer without torch, a refused CPU launch says so once, and the options and warnings around them."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trl_flow_egrpo
from helpers import tiny_trainer
from trl_flow_egrpo import EGRPOConfig
from trl_flow_egrpo.commands import evaluate, train

CONSOLE_SCRIPT = Path(sys.executable).with_name("trl-flow-egrpo")
# The console script of this environment; where the package is not installed with it, the same main through -m.
COMMAND = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "trl_flow_egrpo.cli"]

# What every run printed before the project silenced it (each one's first words).
SILENCED = (
    "is an Enum subclass and is now natively supported",  # torch's pytree, about torchao's enums
    "Unable to import `torchao` Tensor objects",  # diffusers, when torchao is installed
    "No LoRA keys associated to",  # diffusers' load_lora_weights, looking for text-encoder LoRA keys
    "Setting accelerator to CPU",  # DeepSpeed, imported by accelerate's unwrap_model on a CPU run
)

TINY_RECIPE = """\
model_name_or_path: tiny
torch_dtype: float32
dataset_name: {prompts}
reward_funcs: [color]
height: 64
width: 64
max_sequence_length: 32
num_inference_steps: 4
num_active_steps: 2
num_generations: 2
prompts_per_device: 2
mixed_precision: "no"
learning_rate: 0.01
max_steps: 1
save_steps: 0
eval_steps: 0
disable_tqdm: true
report_to: none
output_dir: {output_dir}
"""


def run(args, tmp_path, launcher=COMMAND, timeout=300):
    """``launcher args`` as a user's offline run in ``tmp_path``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"))
    return subprocess.run([*launcher, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def recipe(tmp_path):
    """A tiny recipe (embedded tiny FLUX, 2 prompts, weight-free reward, one iteration) and its output dir."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na fire truck\n")
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(prompts=prompts, output_dir=tmp_path / "run"))
    return path, tmp_path / "run"


@pytest.mark.slow
def test_train_then_evaluate_a_tiny_recipe_end_to_end(recipe, tmp_path):
    path, output_dir = recipe
    trained = run(["train", "--config", str(path), "--max_steps", "2"], tmp_path)
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert (output_dir / "pytorch_lora_weights.safetensors").is_file()
    assert "iteration 2/2" in trained.stdout  # the command line overrode the recipe's max_steps: 1
    results = tmp_path / "scores.json"
    scored = run(
        ["evaluate", "--config", str(path), "--trained_model", str(output_dir), "--test_dataset_name",
         str(tmp_path / "prompts.txt"), "--metrics", "color", "--protocol", "training", "--results_file",
         str(results)],
        tmp_path,
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-4000:]
    assert "| color |" in scored.stdout and results.is_file()
    for output in (trained, scored):
        for warning in SILENCED:
            assert warning not in output.stdout + output.stderr, warning


def test_version_and_help_answer_without_importing_torch():
    code = (
        "import sys\n"
        "from trl_flow_egrpo.cli import main\n"
        "for argv in (['--version'], ['--help'], ['train', '--help'], ['evaluate', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as done:\n"
        "        assert done.code == 0, argv\n"
        "print('HEAVY', [name for name in ('torch', 'diffusers', 'transformers', 'accelerate') if name in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.splitlines()[-1] == "HEAVY []"
    assert f"trl-flow-egrpo {trl_flow_egrpo.__version__}" in result.stdout
    for option in ("--config", "--reward_funcs", "--num_generations", "--report_to", "--trained_model"):
        assert option in result.stdout, option  # train's and evaluate's options, EGRPOConfig's fields included


def test_version_of_the_console_script(tmp_path):
    result = run(["--version"], tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"trl-flow-egrpo {trl_flow_egrpo.__version__}"


def test_reward_names_in_the_help_are_the_registry(tmp_path):
    from trl_flow_egrpo.registry import REWARDS

    assert train.REWARD_NAMES == tuple(REWARDS)


def test_accelerate_cpu_launch_of_two_processes_is_refused_once_with_the_working_command(recipe, tmp_path):
    path, output_dir = recipe
    result = run(
        ["--cpu", "--num_processes", "2", "--quiet", "-m", "trl_flow_egrpo.cli", "train", "--config", str(path)],
        tmp_path,
        launcher=(sys.executable, "-m", "accelerate.commands.launch"),
    )
    assert result.returncode != 0
    working = shlex.join(
        ["torchrun", "--nproc_per_node", "2", "-m", "trl_flow_egrpo.cli", "train", "--config", str(path)]
    )
    assert result.stderr.count(working) == 1, result.stderr
    assert "Traceback" not in result.stderr and not output_dir.exists()


@pytest.mark.parametrize("given", [{"report_to": "tensorboard"}, {"log_with": "tensorboard"}])
def test_report_to_and_log_with_name_the_same_trackers(given):
    config = EGRPOConfig(**given)
    assert config.report_to == config.log_with == "tensorboard"


def test_report_to_from_the_command_line_and_the_recipe(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("report_to: wandb\n")
    _, config = train.parse_arguments(["--config", str(recipe)])
    assert config.report_to == config.log_with == "wandb"
    _, config = train.parse_arguments(["--config", str(recipe), "--report_to", "tensorboard"])
    assert config.report_to == "tensorboard"
    recipe.write_text("log_with: wandb\n")  # the name recipes written for earlier versions use
    _, config = train.parse_arguments(["--config", str(recipe)])
    assert config.report_to == "wandb"
    _, config = evaluate.parse_arguments(["--config", str(recipe), "--log_with", "none"])
    assert config.report_to is None and config.log_with is None


@pytest.mark.parametrize(("report_to", "log_with"), [("tensorboard", "wandb"), ("none", "wandb")])
def test_report_to_and_log_with_that_disagree_are_refused(report_to, log_with):
    with pytest.raises(ValueError, match="report_to=.* and log_with=.* disagree.*Give only one"):
        EGRPOConfig(report_to=report_to, log_with=log_with)


def test_second_trainer_in_one_process_with_another_mixed_precision(tmp_path, caplog):
    first = tiny_trainer(tmp_path / "first", mixed_precision="no")
    with first.accelerator.autocast():
        assert torch.ones(2, 2).mm(torch.ones(2, 2)).dtype == torch.float32
    second = tiny_trainer(tmp_path / "second", mixed_precision="bf16")  # raised in accelerate's state before
    assert second.accelerator.mixed_precision == "bf16"
    with second.accelerator.autocast():
        assert torch.ones(2, 2).mm(torch.ones(2, 2)).dtype == torch.bfloat16
    assert "accelerate keeps one mixed precision per process" in caplog.text


def test_another_mixed_precision_in_a_multi_process_run_is_refused_with_what_to_do(monkeypatch):
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from trl_flow_egrpo.distributed import allow_mixed_precision_change

    state = {"_mixed_precision": "bf16", "num_processes": 2, "distributed_type": DistributedType.MULTI_CPU}
    monkeypatch.setattr(AcceleratorState, "_shared_state", state)
    allow_mixed_precision_change("bf16")  # the same precision: nothing to do
    with pytest.raises(ValueError, match="2-process run already set up accelerate with mixed_precision='bf16'"):
        allow_mixed_precision_change("no")
    assert state["_mixed_precision"] == "bf16"  # the process group's state is left alone


@pytest.mark.parametrize(
    ("recipe_text", "argv", "message"),
    [
        ("max_steps: 2\n", ["--bogus", "1"], "trl-flow-egrpo train: error: unknown options: --bogus 1"),
        ("bogus_key: 1\n", [], "trl-flow-egrpo train: error: unknown keys in the recipe: bogus_key"),
        ("num_generations: 1\n", [], "trl-flow-egrpo train: error: num_generations=1 is not allowed"),
    ],
)
def test_bad_options_exit_with_one_line_that_names_them(tmp_path, capsys, recipe_text, argv, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    with pytest.raises(SystemExit) as done:
        train.parse_arguments(["--config", str(recipe), *argv], prog="trl-flow-egrpo train")
    assert done.value.code == 2
    assert capsys.readouterr().err.startswith(message)  # the message first, not a usage line of every option


def test_evaluate_ignores_the_training_keys_of_a_recipe(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("reward_funcs: [color]\ndataset_name: prompts.txt\nheight: 64\n")
    _, config = evaluate.parse_arguments(["--config", str(recipe)])
    assert config.height == 64


def test_evaluate_refuses_an_editing_model_with_the_way_to_evaluate_it(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("make the square red\n")
    with pytest.raises(SystemExit, match="FluxKontextPipeline edits a source image per prompt.*eval_dataset"):
        evaluate.main(
            ["--model_name_or_path", "tiny-flux-kontext", "--test_dataset_name", str(prompts), "--metrics", "color"]
            + ["--torch_dtype", "float32", "--height", "64", "--width", "64"]
        )
