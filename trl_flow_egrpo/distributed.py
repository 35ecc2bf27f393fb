"""What the trainer and the example scripts need to know about how they were launched.

accelerate is the distributed engine; this module only answers questions accelerate leaves to the caller.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys

logger = logging.getLogger(__name__)


def is_multiprocess_cpu_run() -> bool:
    """Whether this is a multi-process launch (torchrun) on a machine without a GPU.

    accelerate sets up such a run (gloo) only when told it runs on the CPU: pass this as ``cpu=`` to
    ``Accelerator`` / ``PartialState``, including in scripts that touch ``PartialState`` before the trainer.
    """
    import torch  # here, not at the top: the command line's --help reads this module without torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


# Environment variables through which an MPI launcher (mpirun) tells accelerate the number of processes.
_MPI_WORLD_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def single_process_cpu_launch_error(command: list[str], environ=os.environ) -> str | None:
    """Why this process must not run, when ``accelerate launch --cpu --num_processes N`` (N > 1) started it.

    Without ``mpirun`` (``--mpirun_hostfile``), accelerate's CPU launch runs the script in ONE process: it sets
    ``ACCELERATE_USE_CPU`` and, for N > 1, ``MASTER_ADDR``/``MASTER_PORT``, but neither ``WORLD_SIZE`` nor N,
    so the run would silently train on one process and cannot know N to start the others. torchrun starts them.

    Args:
        command: what torchrun runs, for the command that works: the script and its arguments
            (``["examples/hpd.py", "--config", ...]``), or ``["-m", "trl_flow_egrpo.cli", "train", ...]``.
        environ: the process environment.

    Returns:
        The message naming the working ``torchrun`` command, or None for any other launch.
    """
    cpu_launch = environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    several_requested = "MASTER_ADDR" in environ
    started = "WORLD_SIZE" in environ or any(name in environ for name in _MPI_WORLD_SIZE_VARIABLES)
    if not (cpu_launch and several_requested and not started):
        return None
    working = shlex.join(["torchrun", "--nproc_per_node", "2", *command])
    return (
        "`accelerate launch --cpu --num_processes N` starts a single process here (accelerate runs several CPU "
        "processes only under mpirun, with --mpirun_hostfile), so this run would silently use one process. "
        f"Launch the processes with torchrun instead (N=2 shown):\n\n    {working}\n\n"
        "or drop --num_processes for a single-process run."
    )


def refuse_single_process_cpu_launch(command: list[str], environ=os.environ) -> None:
    """Exit with status 1 and :func:`single_process_cpu_launch_error`'s message, before any work, when it applies.

    The message goes to stderr once, without a traceback of this process. ``accelerate launch`` (without
    ``--quiet``) then reports the failed child itself: a ``CalledProcessError`` traceback that repeats the child's
    stderr; ``accelerate launch --quiet`` exits with status 1 and nothing more.
    """
    refusal = single_process_cpu_launch_error(command, environ)
    if refusal:
        print(refusal, file=sys.stderr, flush=True)
        raise SystemExit(1)


def allow_mixed_precision_change(mixed_precision: str) -> None:
    """Let a second trainer in one process (a notebook) use another ``mixed_precision`` than the first.

    accelerate keeps one mixed precision per process (``AcceleratorState``, shared by every ``Accelerator``) and
    refuses a second ``Accelerator`` with another one ("AcceleratorState has already been initialized"). In a
    single process nothing else depends on that state, so it is cleared here and the new ``Accelerator`` sets it
    again; the earlier trainer's ``accelerator.autocast()`` then follows the new precision too (one per process),
    which the warning says. Across several processes the state holds the process group: refused instead.

    Raises:
        ValueError: a multi-process run asks for a second mixed precision.
    """
    from accelerate.state import AcceleratorState, DistributedType

    state = AcceleratorState._shared_state  # empty before the first Accelerator of the process
    current = state.get("_mixed_precision")
    if current is None or current == mixed_precision or state.get("distributed_type") == DistributedType.DEEPSPEED:
        return  # no state yet, the same precision, or DeepSpeed (whose config sets the precision; no conflict)
    if state.get("num_processes", 1) > 1:
        raise ValueError(
            f"mixed_precision={mixed_precision!r}, but this {state['num_processes']}-process run already set up "
            f"accelerate with mixed_precision={current!r}, and accelerate keeps one per process. Give every trainer "
            "of the run the same mixed_precision, or train the second model in a separate launch."
        )
    logger.warning(
        "mixed_precision=%r while an earlier Accelerator of this process uses %r: accelerate keeps one mixed "
        "precision per process, so its state is reset for the new trainer, and earlier trainers now autocast with "
        "%r too.",
        mixed_precision,
        current,
        mixed_precision,
    )
    AcceleratorState._reset_state()


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
    import torch

    if torch.cuda.is_available() or "OMP_NUM_THREADS" in environ:
        return None
    torch.set_num_threads(1)
    logger.info(
        "CPU run: 1 torch thread per process (fastest for the tiny pipelines; set OMP_NUM_THREADS to "
        "choose another count)."
    )
    return 1
