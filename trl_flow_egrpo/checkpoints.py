"""Checkpoints: writing them atomically, checking them, finding the newest one that loads, restoring them.

A checkpoint is written into ``checkpoint-N.tmp`` and published by one ``os.replace`` to
``checkpoint-N``: a crash while saving leaves at most a stale ``.tmp`` directory, never a half-written
``checkpoint-N``, so the previous checkpoint stays the latest valid one. A checkpoint damaged afterwards
(a disk filling up, a copy cut short) is caught by :func:`verify` before anything is loaded from it: the
error names the checkpoint and the file, and ``resume_from_checkpoint=true`` falls back to the newest
checkpoint that verifies (:func:`resolve`), with a warning naming each one it skips.

What a checkpoint holds: accelerate's state (optimizer, scheduler, RNG states; the model weights too when
fully fine-tuning), ``trainable_params.safetensors`` instead of the whole model when training a LoRA (see
:func:`register_trainable_params_hooks`), one ``rollout_generator_<rank>.pt`` per process and
``trainer_state.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import zipfile
from dataclasses import asdict, dataclass, field

import torch

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
TRAINABLE_PARAMS = "trainable_params.safetensors"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Files up to this size are read whole when verified (a CRC check of every member of a torch archive);
# larger ones (a full fine-tune's optimizer state: tens of GB) only get the structural check.
_FULL_CHECK_BYTES = 256 * 2**20


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the checkpoint, the file and the reason."""


@dataclass
class TrainerState:
    """What the trainer knows about its progress; saved in every checkpoint.

    Attributes:
        iteration: completed E-GRPO iterations.
        log_history: one dict of metrics per iteration.
        eval_history: one dict of metrics per evaluation.
    """

    iteration: int = 0
    log_history: list[dict] = field(default_factory=list)
    eval_history: list[dict] = field(default_factory=list)


def checkpoint_dir(output_dir: str, iteration: int) -> str:
    """The final directory of the checkpoint taken after ``iteration`` iterations."""
    return os.path.join(output_dir, f"checkpoint-{iteration}")


def staging_dir(output_dir: str, iteration: int) -> str:
    """Where the checkpoint of ``iteration`` is written before it is published."""
    return checkpoint_dir(output_dir, iteration) + ".tmp"


def generator_file(checkpoint: str, process_index: int) -> str:
    """The file holding process ``process_index``'s rollout-noise generator state."""
    return os.path.join(checkpoint, f"rollout_generator_{process_index}.pt")


def list_checkpoints(output_dir: str) -> list[str]:
    """Published checkpoints in ``output_dir``, oldest first (staging directories are ignored)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest published checkpoint in ``output_dir``, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def publish(staging: str, final: str) -> None:
    """Atomically rename a fully written staging directory to its final name."""
    for root, _, files in os.walk(staging):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
    if os.path.exists(final):  # re-saving the same iteration (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.replace(staging, final)
    directory = os.open(os.path.dirname(final) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def prune(output_dir: str, keep: int | None) -> list[str]:
    """Delete the oldest published checkpoints so that at most ``keep`` remain; returns the deleted.

    ``None`` keeps all. The newest checkpoint is never deleted, whatever ``keep`` says.
    """
    if keep is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    doomed = checkpoints[: max(len(checkpoints) - max(keep, 1), 0)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def write_trainer_state(directory: str, state: TrainerState, config: dict) -> None:
    """Write ``trainer_state.json`` (the progress and the config it was trained with)."""
    with open(os.path.join(directory, TRAINER_STATE), "w") as handle:
        json.dump({**asdict(state), "config": config}, handle, indent=1)


def read_trainer_state(checkpoint: str) -> TrainerState:
    """Read ``trainer_state.json`` of a checkpoint (call :func:`verify` first for a clear error)."""
    with open(os.path.join(checkpoint, TRAINER_STATE)) as handle:
        saved = json.load(handle)
    return TrainerState(
        iteration=saved["iteration"], log_history=saved["log_history"], eval_history=saved.get("eval_history", [])
    )


# ---------------------------------------------------------------------------------------------- verification


def verify(checkpoint: str, process_index: int = 0) -> None:
    """Check that ``checkpoint`` is complete and undamaged, without loading it into a model.

    Checks: ``trainer_state.json`` parses and holds the iteration; this process's rollout generator file
    exists; every safetensors file is as long as its header says; every torch archive (``.bin``, ``.pt``,
    ``.pkl`` written by ``torch.save``) has an intact zip directory, and, up to 256 MiB, intact members.

    Raises:
        CheckpointError: naming the checkpoint, the file and what is wrong with it.
    """
    if not os.path.isdir(checkpoint):
        raise CheckpointError(f"Checkpoint {checkpoint} does not exist (or is not a directory).")
    state_file = os.path.join(checkpoint, TRAINER_STATE)
    if not os.path.isfile(state_file):
        raise CheckpointError(
            f"{checkpoint} is not an E-GRPO checkpoint (no {TRAINER_STATE}). Pass a checkpoint-N "
            "directory written by EGRPOTrainer, or 'true' for the newest one in output_dir."
        )
    try:
        with open(state_file) as handle:
            saved = json.load(handle)
        int(saved["iteration"]), list(saved["log_history"])
    except (ValueError, KeyError, TypeError) as error:
        raise _damaged(checkpoint, TRAINER_STATE, f"it is not valid trainer state ({error})") from error
    if not os.path.isfile(generator_file(checkpoint, process_index)):
        raise _damaged(checkpoint, os.path.basename(generator_file(checkpoint, process_index)), "it is missing")
    for root, _, files in os.walk(checkpoint):
        for name in sorted(files):
            path = os.path.join(root, name)
            problem = _file_problem(path)
            if problem:
                raise _damaged(checkpoint, os.path.relpath(path, checkpoint), problem)


def _damaged(checkpoint: str, file: str, problem: str) -> CheckpointError:
    return CheckpointError(
        f"Checkpoint {checkpoint} is damaged: {file}: {problem}. Resume from an earlier "
        "checkpoint (resume_from_checkpoint=true skips damaged ones), or delete this one."
    )


def _file_problem(path: str) -> str | None:
    """What is wrong with one checkpoint file, or None."""
    size = os.path.getsize(path)
    if path.endswith(".safetensors"):
        return _safetensors_problem(path, size)
    if path.endswith((".bin", ".pt", ".pth", ".pkl")):
        if size == 0:
            return "the file is empty"
        with open(path, "rb") as handle:
            is_archive = handle.read(2) == b"PK"
        if not is_archive:
            return None  # not written by torch.save's zip format; left to the loader
        try:
            with zipfile.ZipFile(path) as archive:
                if size <= _FULL_CHECK_BYTES and archive.testzip() is not None:
                    return "a member of the archive is corrupt"
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            return f"the file is truncated or corrupt ({error})"
    return None


def _safetensors_problem(path: str, size: int) -> str | None:
    # Layout: 8-byte little-endian header length, JSON header, then the tensors' bytes.
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return "the file is truncated (no header)"
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - 8:
            return "the file is truncated (shorter than its header)"
        try:
            header = json.loads(handle.read(header_length))
        except ValueError:
            return "the header is not valid JSON"
    data_length = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if size != 8 + header_length + data_length:
        return f"the file is truncated ({size} bytes, its header describes {8 + header_length + data_length})"
    return None


def resolve(resume_from_checkpoint: str | bool, output_dir: str, process_index: int = 0) -> str:
    """The checkpoint to resume from, verified.

    ``True`` / ``"true"``: the newest checkpoint in ``output_dir`` that verifies; each newer damaged one is
    skipped with a warning naming it. A path: that checkpoint, which must verify.

    Raises:
        CheckpointError: nothing to resume from (no checkpoint, or every one damaged), or the named
            checkpoint is damaged. Never falls back to a fresh start.
    """
    if resume_from_checkpoint is not True and str(resume_from_checkpoint).lower() != "true":
        verify(str(resume_from_checkpoint), process_index)
        return str(resume_from_checkpoint)
    candidates = list_checkpoints(output_dir)
    if not candidates:
        raise CheckpointError(
            f"resume_from_checkpoint=true but {output_dir} holds no checkpoint-N directory. "
            "Start without resume_from_checkpoint, or point it at a checkpoint."
        )
    problems = []
    for checkpoint in reversed(candidates):
        try:
            verify(checkpoint, process_index)
        except CheckpointError as error:
            logger.warning("Skipping checkpoint %s: %s", checkpoint, error)
            problems.append(str(error))
            continue
        return checkpoint
    raise CheckpointError(
        f"resume_from_checkpoint=true but every checkpoint in {output_dir} is damaged:\n" + "\n".join(problems)
    )


# ---------------------------------------------------------------------------------------------- saving, loading


def save(
    accelerator,
    output_dir: str,
    state: TrainerState,
    config: dict,
    generator: torch.Generator,
    save_total_limit: int | None,
    save_extra=None,
) -> str:
    """Write a resumable checkpoint of ``state.iteration`` atomically and prune old ones; every process
    calls this. ``save_extra(directory)``, if given, writes more files into the checkpoint (all processes
    call it, e.g. to gather a sharded LoRA). Returns the published directory."""
    final = checkpoint_dir(output_dir, state.iteration)
    staging = staging_dir(output_dir, state.iteration)
    if accelerator.is_main_process and os.path.exists(staging):
        shutil.rmtree(staging)  # left over by an interrupted save
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)
    torch.save(generator.get_state(), generator_file(staging, accelerator.process_index))
    if accelerator.is_main_process:
        write_trainer_state(staging, state, config)
    if save_extra is not None:
        save_extra(staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish(staging, final)
        prune(output_dir, save_total_limit)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, checkpoint: str, generator: torch.Generator) -> TrainerState:
    """Restore a verified checkpoint into the prepared objects and ``generator``; returns its state.

    Raises:
        CheckpointError: a file that verified but does not load (naming the checkpoint and the error).
    """
    try:
        accelerator.load_state(checkpoint)
        generator.set_state(torch.load(generator_file(checkpoint, accelerator.process_index)))
    except CheckpointError:
        raise
    except Exception as error:  # whatever the loaders raise, the user needs the checkpoint's name
        raise CheckpointError(
            f"Could not load checkpoint {checkpoint}: {type(error).__name__}: {error}. Resume "
            "from an earlier checkpoint, or check it was written with this configuration."
        ) from error
    return read_trainer_state(checkpoint)


def register_trainable_params_hooks(accelerator) -> None:
    """Checkpoint only the trainable parameters of the (one) prepared model, not its frozen base model
    (24 GB for FLUX), in ``trainable_params.safetensors``; restore them on load."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(models[0])
            params = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
            save_file(params, os.path.join(output_dir, TRAINABLE_PARAMS))
        weights.clear()

    def load_hook(models, input_dir):
        model = accelerator.unwrap_model(models.pop())
        params = load_file(os.path.join(input_dir, TRAINABLE_PARAMS))
        expected = {name for name, p in model.named_parameters() if p.requires_grad}
        if set(params) != expected:
            raise CheckpointError(
                f"The checkpoint in {input_dir} was written for other trainable parameters (e.g. "
                "another LoRA rank or target modules). Resume with the configuration it was "
                "trained with."
            )
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in params:
                    parameter.copy_(params[name])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
