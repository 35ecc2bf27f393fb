"""Checkpoint directory bookkeeping: atomic publication, discovery and pruning.

A checkpoint is written into ``checkpoint-N.tmp`` and published by one ``os.replace`` to
``checkpoint-N``: a crash while saving leaves at most a stale ``.tmp`` directory, never a half-written
``checkpoint-N``, so the previous checkpoint stays the latest valid one.
"""

from __future__ import annotations

import os
import re
import shutil

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(output_dir: str, iteration: int) -> str:
    """The final directory of the checkpoint taken after ``iteration`` iterations."""
    return os.path.join(output_dir, f"checkpoint-{iteration}")


def staging_dir(output_dir: str, iteration: int) -> str:
    """Where the checkpoint of ``iteration`` is written before it is published."""
    return checkpoint_dir(output_dir, iteration) + ".tmp"


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
    """Delete the oldest published checkpoints so that at most ``keep`` remain; returns the deleted."""
    if keep is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    doomed = checkpoints[:max(len(checkpoints) - keep, 0)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed
