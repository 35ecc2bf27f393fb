"""No silent damage: bad config is refused, damaged checkpoints are named and skipped, odd inputs accepted."""

import json
import logging
import math
import os

import numpy as np
import pytest
import torch

from helpers import PROMPTS, tiny_config, tiny_trainer
from trl_flow_egrpo import checkpoints
from trl_flow_egrpo.checkpoints import CheckpointError
from trl_flow_egrpo.data import iteration_prompt_indices
from trl_flow_egrpo.tracking import image_grid

# --------------------------------------------------------------------------------------------- bad config


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("max_grad_norm", -1.0, "a finite number > 0, or None"),
        ("max_grad_norm", 0.0, "a finite number > 0, or None"),
        ("entropy_threshold", math.nan, "a finite number >= 0"),
        ("entropy_threshold", math.inf, "a finite number >= 0"),
        ("height", 0, ">= 1"),
        ("width", -16, ">= 1"),
        ("save_steps", -1, ">= 0"),
        ("max_sequence_length", 0, ">= 1"),
        ("warmup_steps", -5, ">= 0"),
        ("learning_rate", math.nan, "a finite number > 0"),
        ("learning_rate", math.inf, "a finite number > 0"),
        ("save_total_limit", 0, ">= 1 .*or None to keep all"),
        ("noise_level", math.inf, "a finite number > 0"),
        ("beta", -0.1, "a finite number >= 0"),
    ],
)
def test_damaging_config_values_are_refused_naming_field_value_and_range(tmp_path, field, value, allowed):
    with pytest.raises(ValueError, match=rf"^{field}={value!r} is not allowed: {field} must be {allowed}"):
        tiny_config(tmp_path, **{field: value})


def test_image_size_must_be_a_multiple_of_the_family_factor(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"height=72: Flux needs image sizes that are positive multiples of 16.*"
        r"EGRPOConfig.height to e.g. 64 or 80",
    ):
        tiny_trainer(tmp_path, height=72)


def test_the_newest_checkpoint_is_never_pruned(tmp_path):
    for iteration in (1, 2, 3):
        os.makedirs(checkpoints.checkpoint_dir(str(tmp_path), iteration))
    assert checkpoints.prune(str(tmp_path), 0) == [str(tmp_path / "checkpoint-1"), str(tmp_path / "checkpoint-2")]
    assert checkpoints.list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-3")]


# --------------------------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """Two checkpoints (iterations 1 and 2) of a tiny run, and the log history of the run."""
    output_dir = tmp_path_factory.mktemp("run")
    history = tiny_trainer(output_dir, max_steps=2, save_steps=1).train().log_history
    return output_dir, history


def _copy_run(saved_run, tmp_path):
    import shutil

    shutil.copytree(saved_run[0], tmp_path / "run")
    return tmp_path / "run"


def _truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(int(size * keep))


DAMAGES = {
    "trainable_params.safetensors": lambda path: _truncate(path),
    "optimizer.bin": lambda path: _truncate(path),
    "rollout_generator_0.pt": os.remove,
    "trainer_state.json": lambda path: open(path, "w").write('{"iteration": 2, "log_hist'),
}


@pytest.mark.parametrize("file", sorted(DAMAGES))
def test_a_damaged_checkpoint_is_named_with_its_file(saved_run, tmp_path, file):
    run = _copy_run(saved_run, tmp_path)
    DAMAGES[file](str(run / "checkpoint-2" / file))
    trainer = tiny_trainer(run, max_steps=3, resume_from_checkpoint=str(run / "checkpoint-2"))
    with pytest.raises(CheckpointError, match=rf"Checkpoint {run / 'checkpoint-2'} is damaged: {file}: "):
        trainer.train()


@pytest.mark.parametrize("file", sorted(DAMAGES))
def test_resume_true_falls_back_to_the_newest_checkpoint_that_loads(saved_run, tmp_path, caplog, file):
    run = _copy_run(saved_run, tmp_path)
    DAMAGES[file](str(run / "checkpoint-2" / file))
    trainer = tiny_trainer(run, max_steps=2, resume_from_checkpoint="true")
    with caplog.at_level(logging.WARNING, logger="trl_flow_egrpo.checkpoints"):
        history = trainer.train().log_history
    assert f"Skipping checkpoint {run / 'checkpoint-2'}" in caplog.text and file in caplog.text
    # Resumed from checkpoint-1: iteration 2 is trained again and equals the uninterrupted run's.
    assert len(history) == 2
    assert history[1]["loss"] == pytest.approx(saved_run[1][1]["loss"], rel=1e-5)
    assert history[1]["reward/weighted_mean"] == pytest.approx(saved_run[1][1]["reward/weighted_mean"], rel=1e-5)


def test_resume_true_never_starts_fresh_when_every_checkpoint_is_damaged(saved_run, tmp_path):
    run = _copy_run(saved_run, tmp_path)
    for iteration in (1, 2):
        _truncate(str(run / f"checkpoint-{iteration}" / "optimizer.bin"))
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged"):
        tiny_trainer(run, max_steps=3, resume_from_checkpoint="true").train()


def test_verify_accepts_intact_checkpoints(saved_run):
    for checkpoint in checkpoints.list_checkpoints(str(saved_run[0])):
        checkpoints.verify(checkpoint)


# --------------------------------------------------------------------------------------------- data and rewards


@pytest.mark.parametrize("dataset", [PROMPTS, [{"prompt": prompt, "style": "photo"} for prompt in PROMPTS]])
def test_plain_lists_are_accepted_as_datasets(tmp_path, dataset):
    seen = set()

    def reward(images, prompts, **columns):
        seen.update(prompts)
        return torch.zeros(len(images))

    tiny_trainer(tmp_path, reward_fns=[reward], dataset=dataset, max_steps=1).step()
    assert seen and seen <= set(PROMPTS)


def test_a_list_of_other_things_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="train_dataset is a list of int: pass prompt strings"):
        tiny_trainer(tmp_path, dataset=[1, 2, 3])


def test_prompt_indices_cover_each_epoch_once_across_processes():
    size, per_process, processes = 7, 2, 2
    stream = [
        i
        for iteration in range(7)
        for rank in range(processes)
        for i in iteration_prompt_indices(iteration, size, per_process, rank, processes, seed=3)
    ]
    epochs = [stream[e * size : (e + 1) * size] for e in range(len(stream) // size)]
    assert all(sorted(epoch) == list(range(size)) for epoch in epochs)
    assert epochs[0] != epochs[1]
    assert iteration_prompt_indices(0, size, 3, shuffle=False) == [0, 1, 2]


def test_zero_std_fraction_counts_groups_without_signal(tmp_path):
    constant = tiny_trainer(
        tmp_path / "constant", reward_fns=[lambda images, prompts: np.ones(len(images))], max_steps=1
    ).step()
    assert constant["zero_std_fraction"] == 1.0
    varied = tiny_trainer(tmp_path / "varied", max_steps=1).step()
    assert varied["zero_std_fraction"] == 0.0


def test_image_grid_has_no_black_cells():
    images = torch.full((3, 3, 4, 4), 0.5)
    grid = image_grid(images)
    assert grid.shape == (4, 12, 3)  # three in a row, no empty cell
    grid = image_grid(torch.full((5, 3, 4, 4), 0.5))
    assert grid.shape == (8, 12, 3) and (grid[4:, 8:] == 255).all()  # the one spare cell is white, not black
    assert (grid[:4] == 128).all()


def test_trainer_state_json_is_plain_json(saved_run):
    with open(os.path.join(saved_run[0], "checkpoint-2", checkpoints.TRAINER_STATE)) as handle:
        state = json.load(handle)
    assert state["iteration"] == 2 and len(state["log_history"]) == 2 and state["config"]["save_steps"] == 1


# --------------------------------------------------------------------------------------------- memory


def test_model_rewards_run_half_precision_on_gpu_and_float32_on_cpu():
    from trl_flow_egrpo.rewards import HPSv2Reward

    reward = HPSv2Reward()
    assert reward.model_dtype(torch.device("cuda")) == torch.float16
    assert reward.model_dtype(torch.device("cpu")) == torch.float32
    assert HPSv2Reward(dtype="bfloat16").model_dtype(torch.device("cuda")) == torch.bfloat16


def test_eval_only_rewards_are_offloaded_after_each_evaluation(tmp_path):
    class EvalReward:
        name = "eval_only"
        offloads = 0

        def __call__(self, images, prompts, **columns):
            return torch.zeros(len(images))

        def offload(self):
            self.offloads += 1

    reward = EvalReward()
    trainer = tiny_trainer(tmp_path, eval_dataset=PROMPTS[:3], eval_reward_fns=[reward], max_steps=2, eval_steps=1)
    trainer.train()
    assert reward.offloads == 2
