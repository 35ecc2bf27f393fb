"""Checkpoints verified by content (issue 18): a manifest of SHA-256 hashes catches changed bytes and missing
files, a mislabeled checkpoint is refused, resuming from an earlier checkpoint sets the abandoned future aside,
and a stray file at a checkpoint's name does not stop publishing."""

import glob
import json
import logging
import os
import re
import shutil
import struct
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_trainer
from trl_flow_egrpo import checkpoints
from trl_flow_egrpo.checkpoints import MANIFEST, TRAINABLE_PARAMS, CheckpointError


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """Three checkpoints (iterations 1-3) of a tiny run, and the log history of the run."""
    output_dir = tmp_path_factory.mktemp("run")
    history = tiny_trainer(output_dir, max_steps=3, save_steps=1).train().log_history
    return output_dir, history


def _copy_run(saved_run, tmp_path):
    shutil.copytree(saved_run[0], tmp_path / "run")
    return tmp_path / "run"


def _flip_four_bytes_in_the_middle(path):
    middle = os.path.getsize(path) // 2
    with open(path, "r+b") as handle:
        handle.seek(middle)
        flipped = bytes(byte ^ 0xFF for byte in handle.read(4))
        handle.seek(middle)
        handle.write(flipped)


def _write_nan_into_first_tensor(path):
    """Overwrite the first float32 value of the first tensor with NaN; the header stays valid."""
    with open(path, "rb") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_length))
    name, entry = next((key, value) for key, value in sorted(header.items()) if key != "__metadata__")
    assert entry["dtype"] == "F32", entry
    with open(path, "r+b") as handle:
        handle.seek(8 + header_length + entry["data_offsets"][0])
        handle.write(struct.pack("<f", float("nan")))
    assert torch.isnan(load_file(path)[name]).any()


DAMAGES = {"four flipped bytes": _flip_four_bytes_in_the_middle, "a NaN": _write_nan_into_first_tensor}


def _trainable_params(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in trainer.unwrapped_model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------- changed bytes


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_changed_bytes_are_named_and_resume_true_falls_back_and_continues_exactly(saved_run, tmp_path, caplog, damage):
    run = _copy_run(saved_run, tmp_path)
    damaged = run / "checkpoint-3" / TRAINABLE_PARAMS
    DAMAGES[damage](str(damaged))
    # The structural check alone (all there was before manifests) passes both: the file is still well formed.
    assert checkpoints._file_problem(str(damaged)) is None

    trainer = tiny_trainer(run, max_steps=3, resume_from_checkpoint="true")
    with caplog.at_level(logging.WARNING, logger="trl_flow_egrpo.checkpoints"):
        history = trainer.train().log_history
    assert f"Skipping checkpoint {run / 'checkpoint-3'}: Checkpoint {run / 'checkpoint-3'} is damaged: " in caplog.text
    assert f"{TRAINABLE_PARAMS}: its content changed since it was saved (SHA-256 mismatch)" in caplog.text
    # Resumed from checkpoint-2: iteration 3 is trained again, exactly as the uninterrupted run trained it.
    assert len(history) == 3 and history[2]["loss"] == saved_run[1][2]["loss"]
    assert history[2]["reward/weighted_mean"] == saved_run[1][2]["reward/weighted_mean"]
    intact = load_file(str(saved_run[0] / "checkpoint-3" / TRAINABLE_PARAMS))
    resumed = _trainable_params(trainer)
    assert intact.keys() == resumed.keys()
    for name, value in intact.items():
        assert torch.equal(resumed[name], value), name
    # The damaged checkpoint is later than the one resumed: set aside, not deleted.
    assert checkpoints.list_checkpoints(str(run)) == [str(run / "checkpoint-1"), str(run / "checkpoint-2")]
    assert len(glob.glob(str(run / "checkpoint-3.abandoned-*" / TRAINABLE_PARAMS))) == 1


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_named_checkpoint_with_changed_bytes_is_refused(saved_run, tmp_path, damage):
    run = _copy_run(saved_run, tmp_path)
    DAMAGES[damage](str(run / "checkpoint-3" / TRAINABLE_PARAMS))
    with pytest.raises(
        CheckpointError,
        match=rf"Checkpoint {run / 'checkpoint-3'} is damaged: {TRAINABLE_PARAMS}: its content changed since it "
        r"was saved .*resume_from_checkpoint=true skips damaged ones",
    ):
        checkpoints.resolve(str(run / "checkpoint-3"), str(run))


def test_the_manifest_covers_every_file_and_itself(saved_run, tmp_path):
    run = _copy_run(saved_run, tmp_path)
    checkpoint = run / "checkpoint-3"
    manifest = checkpoints.read_manifest(str(checkpoint))
    on_disk = sorted(
        os.path.relpath(os.path.join(root, name), checkpoint)
        for root, _, files in os.walk(checkpoint)
        for name in files
        if name != MANIFEST
    )
    assert sorted(manifest["files"]) == on_disk and "rollout_generator_0.pt" in on_disk
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == checkpoints.file_sha256(str(checkpoint / name))
    # A changed hash in the manifest is named as damage to the manifest, not to the file it describes.
    text = (checkpoint / MANIFEST).read_text()
    digest = manifest["files"]["optimizer.bin"]["sha256"]
    (checkpoint / MANIFEST).write_text(text.replace(digest, digest[::-1]))
    with pytest.raises(CheckpointError, match=f"is damaged: {MANIFEST}: its file table does not match its own digest"):
        checkpoints.verify(str(checkpoint))
    (checkpoint / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=f"is damaged: {MANIFEST}: it is not a valid manifest"):
        checkpoints.verify(str(checkpoint))


# --------------------------------------------------------------------------------------------- missing files


@pytest.mark.parametrize("file", ["optimizer.bin", "scheduler.bin", TRAINABLE_PARAMS])
def test_a_missing_file_is_named_and_resume_true_falls_back(saved_run, tmp_path, caplog, file):
    run = _copy_run(saved_run, tmp_path)
    os.remove(run / "checkpoint-3" / file)
    with pytest.raises(CheckpointError, match=rf"Checkpoint {run / 'checkpoint-3'} is damaged: {file}: it is missing"):
        checkpoints.resolve(str(run / "checkpoint-3"), str(run))
    with caplog.at_level(logging.WARNING, logger="trl_flow_egrpo.checkpoints"):
        assert checkpoints.resolve("true", str(run)) == str(run / "checkpoint-2")
    assert f"Skipping checkpoint {run / 'checkpoint-3'}" in caplog.text and f"{file}: it is missing" in caplog.text


def test_checkpoints_without_a_manifest_get_the_structural_checks_with_a_warning(saved_run, tmp_path, caplog):
    run = _copy_run(saved_run, tmp_path)
    for checkpoint in checkpoints.list_checkpoints(str(run)):
        os.remove(os.path.join(checkpoint, MANIFEST))
    with caplog.at_level(logging.WARNING, logger="trl_flow_egrpo.checkpoints"):
        checkpoints.verify(str(run / "checkpoint-3"))
    assert f"Checkpoint {run / 'checkpoint-3'} has no {MANIFEST}" in caplog.text
    _write_nan_into_first_tensor(str(run / "checkpoint-3" / TRAINABLE_PARAMS))
    with pytest.raises(CheckpointError, match=rf"damaged: {TRAINABLE_PARAMS}: tensor .* holds NaN or inf"):
        checkpoints.verify(str(run / "checkpoint-3"))


# --------------------------------------------------------------------------------------------- stale future


def test_resuming_from_an_earlier_checkpoint_sets_the_abandoned_future_aside(saved_run, tmp_path, caplog):
    run = _copy_run(saved_run, tmp_path)
    abandoned_state = (run / "checkpoint-3" / checkpoints.TRAINER_STATE).read_text()
    trainer = tiny_trainer(
        run, max_steps=2, save_steps=1, save_total_limit=1, resume_from_checkpoint=str(run / "checkpoint-1")
    )
    with caplog.at_level(logging.WARNING, logger="trl_flow_egrpo.checkpoints"):
        trainer.train()
    # Before: checkpoint-2 of the new run was pruned as older than the abandoned checkpoint-3, which stayed
    # the newest, so that resume_from_checkpoint=true continued the abandoned run.
    assert checkpoints.list_checkpoints(str(run)) == [str(run / "checkpoint-2")]
    assert checkpoints.resolve("true", str(run)) == str(run / "checkpoint-2")
    for iteration in (2, 3):
        (aside,) = glob.glob(str(run / f"checkpoint-{iteration}.abandoned-*"))
        assert f"the later {run / f'checkpoint-{iteration}'} belongs to an abandoned run; renamed it to {aside}" in (
            caplog.text
        )
        checkpoints.verify(aside)  # kept whole
    (aside_3,) = glob.glob(str(run / "checkpoint-3.abandoned-*"))
    assert open(os.path.join(aside_3, checkpoints.TRAINER_STATE)).read() == abandoned_state


def test_a_fresh_run_in_a_used_output_dir_sets_the_earlier_runs_checkpoints_aside(saved_run, tmp_path):
    run = _copy_run(saved_run, tmp_path)
    tiny_trainer(run, max_steps=1, save_steps=1, save_total_limit=1).train()
    # Before: the new checkpoint-1 was pruned at once as older than the earlier run's checkpoint-3.
    assert checkpoints.list_checkpoints(str(run)) == [str(run / "checkpoint-1")]
    assert len(glob.glob(str(run / "checkpoint-[23].abandoned-*"))) == 2


def test_resuming_the_newest_checkpoint_sets_nothing_aside(saved_run, tmp_path):
    run = _copy_run(saved_run, tmp_path)
    assert checkpoints.set_aside_later_checkpoints(str(run), 3) == []
    assert len(checkpoints.list_checkpoints(str(run))) == 3 and not glob.glob(str(run / "*.abandoned-*"))


# --------------------------------------------------------------------------------------------- mislabeled


def test_a_checkpoint_whose_iteration_disagrees_with_its_name_is_refused(saved_run, tmp_path, caplog):
    run = _copy_run(saved_run, tmp_path)
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-5")  # intact files, manifest included
    message = rf"{run / 'checkpoint-5'} is damaged: trainer_state.json: it records iteration 2 but the directory is "
    with pytest.raises(CheckpointError, match=message + "named checkpoint-5"):
        checkpoints.resolve(str(run / "checkpoint-5"), str(run))
    with caplog.at_level(logging.WARNING, logger="trl_flow_egrpo.checkpoints"):
        assert checkpoints.resolve("true", str(run)) == str(run / "checkpoint-3")
    assert f"Skipping checkpoint {run / 'checkpoint-5'}" in caplog.text


# --------------------------------------------------------------------------------------------- not a directory


def test_a_file_named_like_a_checkpoint_is_ignored_and_renamed_aside_when_publishing(saved_run, tmp_path, caplog):
    run = _copy_run(saved_run, tmp_path)
    (run / "checkpoint-4").write_text("notes of the user")
    assert checkpoints.latest_checkpoint(str(run)) == str(run / "checkpoint-3")
    trainer = tiny_trainer(run, max_steps=4, save_steps=1, resume_from_checkpoint="true")
    with caplog.at_level(logging.WARNING, logger="trl_flow_egrpo.checkpoints"):
        trainer.train()  # before: NotADirectoryError in shutil.rmtree while publishing checkpoint-4
    assert checkpoints.latest_checkpoint(str(run)) == str(run / "checkpoint-4")
    checkpoints.verify(str(run / "checkpoint-4"))
    (aside,) = glob.glob(str(run / "checkpoint-4.not-a-checkpoint-*"))
    assert open(aside).read() == "notes of the user"
    assert f"{run / 'checkpoint-4'} is not a checkpoint directory: renamed it to {aside}" in caplog.text


def test_checkpoints_set_aside_are_not_uploaded_with_the_output_dir():
    from huggingface_hub.utils import filter_repo_objects

    from trl_flow_egrpo.hub import DEFAULT_IGNORE_PATTERNS

    files = ["checkpoint-5.abandoned-20261207T153000Z/optimizer.bin", "pytorch_lora_weights.safetensors"]
    kept = list(filter_repo_objects(files, ignore_patterns=list(DEFAULT_IGNORE_PATTERNS)))
    assert kept == ["pytorch_lora_weights.safetensors"]


# --------------------------------------------------------------------------------------------- several processes


class _Process:
    """What :func:`checkpoints.resume_checkpoint` asks of an accelerator, for one of two processes."""

    def __init__(self, index):
        self.process_index, self.is_main_process, self.num_processes = index, index == 0, 2


@pytest.mark.parametrize("damaged", [False, True])
def test_every_process_resumes_from_the_main_process_choice(saved_run, tmp_path, monkeypatch, damaged):
    import accelerate.utils

    run = _copy_run(saved_run, tmp_path)
    shutil.copy(run / "checkpoint-1" / "rollout_generator_0.pt", run / "checkpoint-1" / "rollout_generator_1.pt")
    if damaged:
        _flip_four_bytes_in_the_middle(str(run / "checkpoint-1" / TRAINABLE_PARAMS))
    sent = []
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects, from_process: sent.append(objects))

    def main_choice():
        try:
            return checkpoints.resume_checkpoint(_Process(0), str(run / "checkpoint-1"), str(run))
        except CheckpointError as error:
            return str(error)

    on_main = main_choice()
    assert len(glob.glob(str(run / "checkpoint-*.abandoned-*"))) == (0 if damaged else 2)

    # The other process verifies and renames nothing: it receives the main process's choice (or error).
    monkeypatch.setattr(checkpoints, "resolve", lambda *args: pytest.fail("only the main process verifies"))
    monkeypatch.setattr(
        accelerate.utils,
        "broadcast_object_list",
        lambda objects, from_process: objects.__setitem__(slice(None), sent[0]),
    )
    if damaged:
        assert f"{TRAINABLE_PARAMS}: its content changed" in on_main
        with pytest.raises(CheckpointError) as raised:
            checkpoints.resume_checkpoint(_Process(1), str(run / "checkpoint-1"), str(run))
        assert str(raised.value) == on_main
    else:
        assert on_main == str(run / "checkpoint-1")
        assert checkpoints.resume_checkpoint(_Process(1), str(run / "checkpoint-1"), str(run)) == on_main


def test_the_hashing_benchmark_runs(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import checkpoint_hashing

    checkpoint_hashing.main(["--mib", "1", "--repeats", "1"])
    assert re.fullmatch(
        r"repeat 1: 4 MiB checkpoint: write_manifest [\d.]+ s, verify with the manifest [\d.]+ s \(\d+ MiB/s\), "
        r"structural checks only [\d.]+ s\n",
        capsys.readouterr().out,
    )
