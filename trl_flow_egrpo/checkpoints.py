"""Checkpoints: writing them atomically, checking them, finding the newest one that loads, restoring them.

A checkpoint is written into ``checkpoint-N.tmp`` and published by one ``os.replace`` to
``checkpoint-N``: a crash while saving leaves at most a stale ``.tmp`` directory, never a half-written
``checkpoint-N``, so the previous checkpoint stays the latest valid one. Just before publishing, the main
process writes ``checkpoint_manifest.json``: the size and SHA-256 of every file of every process (written
after all of them exist). A checkpoint damaged afterwards (a disk filling up, a copy cut short, flipped
bytes) is caught by :func:`verify` before anything is loaded from it: the error names the checkpoint and the
file, and ``resume_from_checkpoint=true`` falls back to the newest checkpoint that verifies (:func:`resolve`),
with a warning naming each one it skips. A checkpoint written before manifests existed gets the structural
checks only (with a warning). Resuming from an earlier checkpoint renames the later ones of ``output_dir``
aside (``checkpoint-N.abandoned-<time>``, :func:`set_aside_later_checkpoints`), so that pruning and a later
``resume_from_checkpoint=true`` see only the resumed run.

What a checkpoint holds: accelerate's state (optimizer, scheduler, RNG states; the model weights too when
fully fine-tuning), ``trainable_params.safetensors`` instead of the whole model when training a LoRA (see
:func:`register_trainable_params_hooks`), one ``rollout_generator_<rank>.pt`` per process and
``trainer_state.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import time
import zipfile
from dataclasses import asdict, dataclass, field

import torch

from .redaction import redact

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
TRAINABLE_PARAMS = "trainable_params.safetensors"
OLD_POLICY = "old_policy.safetensors"
"""The EMA "old" policy's parameters of a strategy that keeps one (DiffusionNFT), by parameter name."""
MANIFEST = "checkpoint_manifest.json"
"""The file listing the size and SHA-256 of every other file of a checkpoint, written last."""
_MANIFEST_FORMAT = 1
_HASH_CHUNK_BYTES = 2**20
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


def checkpoint_iteration(checkpoint: str) -> int | None:
    """The iteration a ``checkpoint-N`` directory's name says it holds, or None for another name."""
    match = _CHECKPOINT.match(os.path.basename(os.path.normpath(checkpoint)))
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str) -> list[str]:
    """Published checkpoints in ``output_dir``, oldest first: the ``checkpoint-N`` directories (staging
    directories, checkpoints set aside and anything that is not a directory are ignored)."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        (int(m.group(1)), name)
        for name in os.listdir(output_dir)
        if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    ]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest published checkpoint in ``output_dir``, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def aside_name(path: str, reason: str) -> str:
    """A free name next to ``path`` to rename it to: ``<path>.<reason>-<UTC time>`` (``-2``, ``-3``... if
    taken). Being no ``checkpoint-N`` name, it is neither listed nor pruned; a directory so renamed is not
    uploaded with ``output_dir`` either (``hub.DEFAULT_IGNORE_PATTERNS`` leaves out ``checkpoint-*/**``)."""
    base = f"{path}.{reason}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    candidate, suffix = base, 1
    while os.path.lexists(candidate):
        suffix += 1
        candidate = f"{base}-{suffix}"
    return candidate


def publish(staging: str, final: str) -> None:
    """Atomically rename a fully written staging directory to its final name.

    An existing checkpoint of the same iteration (re-saving it, e.g. by hand after ``train()``) is replaced
    whole. Anything else at that name (a file, a link, a directory without ``trainer_state.json``) is renamed
    aside with a warning saying where, never deleted.
    """
    for root, _, files in os.walk(staging):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
    if os.path.islink(final) or (os.path.lexists(final) and not os.path.isfile(os.path.join(final, TRAINER_STATE))):
        aside = aside_name(final, "not-a-checkpoint")
        os.replace(final, aside)
        logger.warning("%s is not a checkpoint directory: renamed it to %s to publish the checkpoint.", final, aside)
    elif os.path.exists(final):
        logger.info("Replacing the existing %s.", final)
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
        if os.path.islink(path):  # a link to a checkpoint kept elsewhere: remove the link, not its target
            os.unlink(path)
        else:
            shutil.rmtree(path)
    return doomed


def set_aside_later_checkpoints(output_dir: str, iteration: int) -> list[tuple[str, str]]:
    """Rename every checkpoint of ``output_dir`` later than ``iteration`` to ``checkpoint-N.abandoned-<time>``;
    returns the ``(old, new)`` paths, each logged as a warning.

    Resuming from iteration ``k`` (or starting afresh, ``k = 0``, in an ``output_dir`` that holds an earlier
    run's checkpoints) starts a new future: the later checkpoints belong to the run that was abandoned. Left
    in place they would win over the new run's (``save_total_limit`` would prune the new ones as the oldest,
    and a later ``resume_from_checkpoint=true`` would continue the abandoned run).
    Renamed, they are kept for the user but no longer listed, pruned or uploaded.
    """
    moved = []
    for checkpoint in list_checkpoints(output_dir):
        if checkpoint_iteration(checkpoint) > iteration:
            aside = aside_name(checkpoint, "abandoned")
            os.replace(checkpoint, aside)
            moved.append((checkpoint, aside))
            logger.warning(
                "Training from iteration %d: the later %s belongs to an abandoned run; renamed it to %s.",
                iteration,
                checkpoint,
                aside,
            )
    return moved


def write_trainer_state(directory: str, state: TrainerState, config: dict) -> None:
    """Write ``trainer_state.json`` (the progress and the config it was trained with, secrets redacted: the file
    is uploaded with ``hub_strategy="every_save"``)."""
    with open(os.path.join(directory, TRAINER_STATE), "w") as handle:
        json.dump({**asdict(state), "config": redact(config)}, handle, indent=1)


def read_trainer_state(checkpoint: str) -> TrainerState:
    """Read ``trainer_state.json`` of a checkpoint (call :func:`verify` first for a clear error)."""
    with open(os.path.join(checkpoint, TRAINER_STATE)) as handle:
        saved = json.load(handle)
    return TrainerState(
        iteration=saved["iteration"], log_history=saved["log_history"], eval_history=saved.get("eval_history", [])
    )


# ---------------------------------------------------------------------------------------------- verification


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's content (hex), read in 1 MiB chunks so that memory stays flat."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _relative_files(directory: str) -> list[str]:
    """Every file under ``directory`` but the manifest, as sorted ``/``-separated relative paths."""
    found = []
    for root, _, files in os.walk(directory):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
            if relative != MANIFEST:
                found.append(relative)
    return sorted(found)


def _files_digest(files: dict) -> str:
    """The SHA-256 of the manifest's file table in a canonical JSON form: the manifest's check of itself."""
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build_manifest(directory: str) -> dict:
    """The manifest of a fully written checkpoint directory: the size and SHA-256 of every file in it (the
    manifest itself excepted), and the digest of that table, so that damage to the manifest is caught too."""
    files = {}
    for relative in _relative_files(directory):
        path = os.path.join(directory, relative)
        files[relative] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
    return {"format": _MANIFEST_FORMAT, "files": files, "files_sha256": _files_digest(files)}


def write_manifest(directory: str) -> dict:
    """Write ``checkpoint_manifest.json`` into ``directory`` (once every process's files are written: it
    covers what is there); returns the manifest."""
    manifest = build_manifest(directory)
    with open(os.path.join(directory, MANIFEST), "w") as handle:
        json.dump(manifest, handle, indent=1)
    return manifest


def read_manifest(checkpoint: str) -> dict | None:
    """The manifest of ``checkpoint``, or None for a checkpoint written without one.

    Raises:
        CheckpointError: the manifest is not valid JSON, has an unknown format, or does not match its own
            digest.
    """
    path = os.path.join(checkpoint, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            manifest = json.load(handle)
        files, format_, recorded = manifest["files"], manifest["format"], manifest["files_sha256"]
    except (ValueError, KeyError, TypeError) as error:
        raise _damaged(checkpoint, MANIFEST, f"it is not a valid manifest ({error!r})") from error
    if not isinstance(files, dict) or not all(map(_is_manifest_entry, files.values())):
        raise _damaged(checkpoint, MANIFEST, "its file table is not a mapping of sizes and hashes")
    if format_ != _MANIFEST_FORMAT:
        raise CheckpointError(
            f"Checkpoint {checkpoint}: {MANIFEST} has format {format_!r}; this version of trl-flow-egrpo reads "
            f"format {_MANIFEST_FORMAT}. Resume with the version that wrote it."
        )
    if _files_digest(files) != recorded:
        raise _damaged(checkpoint, MANIFEST, "its file table does not match its own digest")
    return manifest


def _is_manifest_entry(entry) -> bool:
    """Whether one row of a manifest's file table has the shape :func:`build_manifest` writes."""
    return isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)


def _manifest_mismatch(checkpoint: str, manifest: dict) -> tuple[str, str] | None:
    """The first file of ``checkpoint`` that differs from its manifest, and how; None if all match. Sizes are
    compared first (no reading), so a truncated file is found before any hashing."""
    files = manifest["files"]
    for relative, entry in files.items():
        path = os.path.join(checkpoint, *relative.split("/"))
        if not os.path.isfile(path):
            return relative, "it is missing"
        size = os.path.getsize(path)
        if size != entry["size"]:
            return relative, f"it has {size} bytes, {entry['size']} when it was saved"
    for relative, entry in files.items():
        if file_sha256(os.path.join(checkpoint, *relative.split("/"))) != entry["sha256"]:
            return relative, "its content changed since it was saved (SHA-256 mismatch)"
    return None


def verify(checkpoint: str, num_processes: int = 1) -> None:
    """Check that ``checkpoint`` is complete and undamaged, without loading it into a model.

    Checks, in order:

    - with a manifest (checkpoints written by this version): every file it lists exists with the recorded
      size and SHA-256 (files added later are not checked; nothing loads them);
    - ``trainer_state.json`` parses, and the iteration it records is the ``N`` of the directory's name
      ``checkpoint-N`` (a renamed checkpoint would resume at another iteration than its name says);
    - each of ``num_processes`` processes finds its rollout generator file;
    - without a manifest (written before manifests existed; accepted with a warning): every safetensors file
      is as long as its header says (and ``trainable_params.safetensors`` holds only finite numbers); every
      torch archive (``.bin``, ``.pt``, ``.pkl`` written by ``torch.save``) has an intact zip directory and,
      up to 256 MiB, intact members. These structural checks do not catch changed bytes or missing files.

    Raises:
        CheckpointError: naming the checkpoint, the file and what is wrong with it.
    """
    if not os.path.isdir(checkpoint):
        raise CheckpointError(f"Checkpoint {checkpoint} does not exist (or is not a directory).")
    manifest = read_manifest(checkpoint)
    if manifest is not None and (mismatch := _manifest_mismatch(checkpoint, manifest)):
        raise _damaged(checkpoint, *mismatch)
    state_file = os.path.join(checkpoint, TRAINER_STATE)
    if not os.path.isfile(state_file):
        raise CheckpointError(
            f"{checkpoint} is not an E-GRPO checkpoint (no {TRAINER_STATE}). Pass a checkpoint-N "
            "directory written by EGRPOTrainer, or 'true' for the newest one in output_dir."
        )
    try:
        with open(state_file) as handle:
            saved = json.load(handle)
        iteration = int(saved["iteration"])
        list(saved["log_history"])
    except (ValueError, KeyError, TypeError) as error:
        raise _damaged(checkpoint, TRAINER_STATE, f"it is not valid trainer state ({error})") from error
    named = checkpoint_iteration(checkpoint)
    if named is not None and named != iteration:
        raise _damaged(
            checkpoint,
            TRAINER_STATE,
            f"it records iteration {iteration} but the directory is named checkpoint-{named} (renamed by hand?)",
        )
    for process_index in range(num_processes):
        if not os.path.isfile(generator_file(checkpoint, process_index)):
            raise _damaged(checkpoint, os.path.basename(generator_file(checkpoint, process_index)), "it is missing")
    if manifest is None:
        logger.warning(
            "Checkpoint %s has no %s (written by an earlier version): checking its files' structure only, "
            "which misses changed bytes and missing files.",
            checkpoint,
            MANIFEST,
        )
        for relative in _relative_files(checkpoint):
            path = os.path.join(checkpoint, relative)
            problem = _file_problem(path) or (_non_finite_problem(path) if relative == TRAINABLE_PARAMS else None)
            if problem:
                raise _damaged(checkpoint, relative, problem)


def _non_finite_problem(path: str) -> str | None:
    """The first tensor of a safetensors file holding NaN or inf, as a problem; None if all are finite."""
    from safetensors.torch import load_file

    for name, tensor in load_file(path).items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"tensor {name} holds NaN or inf"
    return None


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


def resolve(resume_from_checkpoint: str | bool, output_dir: str, num_processes: int = 1) -> str:
    """The checkpoint to resume from, verified (:func:`verify`, for ``num_processes`` processes).

    ``True`` / ``"true"``: the newest checkpoint in ``output_dir`` that verifies; each newer damaged one is
    skipped with a warning naming it and why. A path: that checkpoint, which must verify; a damaged one is
    refused, not replaced by another (the user chose it; the error says that ``true`` skips damaged ones).

    Raises:
        CheckpointError: nothing to resume from (no checkpoint, or every one damaged), or the named
            checkpoint is damaged. Never falls back to a fresh start.
    """
    if resume_from_checkpoint is not True and str(resume_from_checkpoint).lower() != "true":
        verify(str(resume_from_checkpoint), num_processes)
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
            verify(checkpoint, num_processes)
        except CheckpointError as error:
            logger.warning("Skipping checkpoint %s: %s", checkpoint, error)
            problems.append(str(error))
            continue
        return checkpoint
    raise CheckpointError(
        f"resume_from_checkpoint=true but every checkpoint in {output_dir} is damaged:\n" + "\n".join(problems)
    )


def resume_checkpoint(accelerator, resume_from_checkpoint: str | bool, output_dir: str) -> str:
    """The checkpoint every process resumes from; every process calls this.

    The main process alone verifies (:func:`resolve`: reading every file once, not once per process) and
    renames the checkpoints of ``output_dir`` later than the chosen one aside
    (:func:`set_aside_later_checkpoints`), before any process goes on; then it sends the choice, or the
    error, to the others, so that all resume from the same checkpoint or all raise the same error.

    Raises:
        CheckpointError: as :func:`resolve`, on every process.
    """
    choice = [None, None]  # [checkpoint, error message]
    if accelerator.is_main_process:
        try:
            checkpoint = resolve(resume_from_checkpoint, output_dir, accelerator.num_processes)
            set_aside_later_checkpoints(output_dir, read_trainer_state(checkpoint).iteration)
            choice = [checkpoint, None]
        except CheckpointError as error:
            choice = [None, str(error)]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(choice, from_process=0)
    checkpoint, message = choice
    if message is not None:
        raise CheckpointError(message)
    return checkpoint


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
    call it, e.g. to gather a sharded LoRA). Once every process has written its files, the main process
    writes the manifest of all of them (:func:`write_manifest`) and publishes. Returns the published
    directory."""
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
        write_manifest(staging)
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


def save_old_policy(directory: str, old_policy: dict[str, torch.Tensor]) -> None:
    """Write the old policy's parameters into the checkpoint ``directory`` (main process only)."""
    from safetensors.torch import save_file

    save_file(
        {name: value.detach().contiguous().cpu() for name, value in old_policy.items()},
        os.path.join(directory, OLD_POLICY),
    )


def load_old_policy(checkpoint: str, old_policy: dict[str, torch.Tensor]) -> None:
    """Copy the old policy saved in ``checkpoint`` into ``old_policy`` (same names, in place).

    Raises:
        CheckpointError: the checkpoint has no old policy or one of other parameters.
    """
    from safetensors.torch import load_file

    path = os.path.join(checkpoint, OLD_POLICY)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"Checkpoint {checkpoint} has no {OLD_POLICY}: it was written by an algorithm that keeps no old policy. "
            "Resume with the algorithm it was trained with."
        )
    saved = load_file(path)
    if set(saved) != set(old_policy):
        raise CheckpointError(
            f"Checkpoint {checkpoint}: {OLD_POLICY} holds other parameters than the trained ones (another LoRA rank "
            "or target modules). Resume with the configuration it was trained with."
        )
    with torch.no_grad():
        for name, value in old_policy.items():
            value.copy_(saved[name])


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
        non_finite = [name for name, value in params.items() if not torch.isfinite(value).all()]
        if non_finite:  # saved so by training itself (the manifest matched): training on would stay NaN
            raise CheckpointError(
                f"Checkpoint {input_dir}: {TRAINABLE_PARAMS} holds NaN or inf in {non_finite[0]} "
                f"({len(non_finite)} tensors). Resume from an earlier checkpoint."
            )
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in params:
                    parameter.copy_(params[name])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
