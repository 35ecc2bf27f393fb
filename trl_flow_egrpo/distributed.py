"""What the trainer and the example scripts need to know about how they were launched.

accelerate is the distributed engine; this module only answers questions accelerate leaves to the caller.
"""

from __future__ import annotations

import logging
import os
import shlex

import torch

logger = logging.getLogger(__name__)


def is_multiprocess_cpu_run() -> bool:
    """Whether this is a multi-process launch (torchrun) on a machine without a GPU.

    accelerate sets up such a run (gloo) only when told it runs on the CPU: pass this as ``cpu=`` to
    ``Accelerator`` / ``PartialState``, including in scripts that touch ``PartialState`` before the trainer.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


# Environment variables through which an MPI launcher (mpirun) tells accelerate the number of processes.
_MPI_WORLD_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def single_process_cpu_launch_error(script: str, arguments: list[str], environ=os.environ) -> str | None:
    """Why this process must not run, when ``accelerate launch --cpu --num_processes N`` (N > 1) started it.

    Without ``mpirun`` (``--mpirun_hostfile``), accelerate's CPU launch runs the script in ONE process: it sets
    ``ACCELERATE_USE_CPU`` and, for N > 1, ``MASTER_ADDR``/``MASTER_PORT``, but neither ``WORLD_SIZE`` nor N,
    so the run would silently train on one process and cannot know N to start the others. torchrun starts them.

    Args:
        script: the script's path, for the command that works.
        arguments: the script's command-line arguments, repeated in that command.
        environ: the process environment.

    Returns:
        The message naming the working ``torchrun`` command, or None for any other launch.
    """
    cpu_launch = environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    several_requested = "MASTER_ADDR" in environ
    started = "WORLD_SIZE" in environ or any(name in environ for name in _MPI_WORLD_SIZE_VARIABLES)
    if not (cpu_launch and several_requested and not started):
        return None
    command = shlex.join(["torchrun", "--nproc_per_node", "2", script, *arguments])
    return (
        "`accelerate launch --cpu --num_processes N` starts a single process here (accelerate runs several CPU "
        "processes only under mpirun, with --mpirun_hostfile), so this run would silently use one process. "
        f"Launch the processes with torchrun instead (N=2 shown):\n\n    {command}\n\n"
        "or drop --num_processes for a single-process run."
    )


def set_cpu_threads(environ=os.environ) -> int | None:
    """Use one intra-op thread per process for a CPU run, unless ``OMP_NUM_THREADS`` says otherwise.

    CPU runs of the example scripts are runs of the tiny pipelines, whose matrices are too small for
    intra-op parallelism to pay, while every extra OpenMP thread contends with the other processes on the
    machine: ``examples/hpd.py`` on the tiny FLUX pipeline (64x64, 8 steps, G=4) measured 0.21 s per iteration
    with one thread against 3.3 s with torch's default of one thread per core, on a busy 2-core machine.
    torchrun already sets ``OMP_NUM_THREADS=1`` for several processes; this covers single-process runs.

    Returns:
        The thread count set, or None when it was left alone (a GPU is present, or ``OMP_NUM_THREADS`` is set).
    """
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in environ:
        return None
    torch.set_num_threads(1)
    logger.info(
        "CPU run: 1 torch thread per process (fastest for the tiny pipelines; set OMP_NUM_THREADS to "
        "choose another count)."
    )
    return 1
