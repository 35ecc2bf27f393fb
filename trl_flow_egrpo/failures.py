"""Stop every process of a multi-process run when one of them fails.

When one process raises (a reward server down, an out-of-memory error, a full disk), the others go on
to their next collective (a gradient all-reduce, an FSDP all-gather, a metrics gather) and wait there for
the failed one, until the backend's timeout: 30 minutes by default (NCCL detects no dead peer; only a
launcher that owns every process, such as torchrun on a single machine, ends them sooner).

:func:`propagate_failures` closes that gap without touching the training collectives. The failing process
writes its error to the process group's key-value store (the TCPStore every process already uses to
start) and then raises its own error as usual. Every other process runs a watcher thread that polls the
store about once a second; when it finds a failure it logs which process failed and with what error,
and ends its process with exit code 1. The main thread cannot raise instead: it may be blocked inside a
collective that waits for the dead peer, which no Python exception can interrupt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time

import torch

logger = logging.getLogger(__name__)

FAILURE_KEY = "trl_flow_egrpo/failure"
ACKNOWLEDGED_KEY = "trl_flow_egrpo/failure_acknowledged"
EXIT_CODE = 1


def failure_message(rank: int, error: BaseException) -> str:
    """The text a failing process publishes: its rank and its error (type and message)."""
    return f"rank {rank} failed with {type(error).__name__}: {error}"


def stop_message(rank: int, published: str) -> str:
    """What a process stopped because of another's failure prints before exiting."""
    return (
        f"E-GRPO: stopping rank {rank} because {published} (see that rank's output for the traceback). "
        f"Exiting with code {EXIT_CODE}."
    )


class FailureWatcher:
    """Polls ``store`` for another process's failure; on finding one, reports it and ends this process.

    Args:
        store: a ``torch.distributed.Store`` shared by all processes.
        rank: this process's rank, for the report.
        poll_seconds: time between two polls; a failure stops the others within about this time.
        exit_process: called with the exit code once the failure is reported (``os._exit``; tests substitute it).
    """

    def __init__(self, store, rank: int, poll_seconds: float = 1.0, exit_process=os._exit):
        self.store, self.rank, self.poll_seconds, self.exit_process = store, rank, poll_seconds, exit_process
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="trl_flow_egrpo-failure-watcher", daemon=True)

    def start(self) -> FailureWatcher:
        """Start polling in a daemon thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling (the run ended, or this process failed and reports it itself)."""
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                if not self.store.check([FAILURE_KEY]):
                    continue
                published = self.store.get(FAILURE_KEY).decode()
                self.store.add(ACKNOWLEDGED_KEY, 1)
            except Exception as error:  # the store's host (rank 0) is gone: it failed without a word
                if self._stop.is_set():
                    return
                published = f"the store hosted by rank 0 became unreachable ({type(error).__name__}: {error})"
            message = stop_message(self.rank, published)
            logger.error(message)
            print(message, file=sys.stderr, flush=True)
            self.exit_process(EXIT_CODE)
            return


def publish_failure(store, rank: int, error: BaseException, others: int, wait_seconds: float) -> None:
    """Write this process's failure to ``store`` (the first failure wins) and wait up to ``wait_seconds`` for
    the ``others`` processes' watchers to read it, so that they can report it even when this process hosts the
    store and its exit takes the store down."""
    store.compare_set(FAILURE_KEY, "", failure_message(rank, error))
    deadline = time.monotonic() + wait_seconds
    while store.add(ACKNOWLEDGED_KEY, 0) < others and time.monotonic() < deadline:
        time.sleep(0.05)


@contextlib.contextmanager
def propagate_failures(accelerator, poll_seconds: float = 1.0, wait_seconds: float = 10.0):
    """Run the body so that an exception on any process stops every process within about ``poll_seconds``.

    The failing process raises its own exception unchanged (after publishing it). The others print
    ``E-GRPO: stopping rank R because rank F failed with <type>: <message> ...`` and exit with code 1. Without
    a process group with a key-value store (one process; MPI) this does nothing. On a normal exit every
    process stops its watcher, then waits for the others, so that no watcher sees rank 0's store vanish as a
    failure.

    Args:
        accelerator: the run's ``Accelerator``.
        poll_seconds: how often each process checks for another's failure.
        wait_seconds: at most how long the failing process waits for the others to read its failure.
    """
    distributed = torch.distributed
    multiprocess = accelerator.num_processes > 1 and distributed.is_available() and distributed.is_initialized()
    store = distributed.distributed_c10d._get_default_store() if multiprocess else None
    if store is None:  # one process, or a process group without a store (MPI)
        yield
        return
    # The watcher gets its own connection where the store allows it, so that it never waits behind the main
    # thread's store requests (NCCL creates communicators through the store).
    try:
        watcher_store = store.clone()
    except (AttributeError, RuntimeError):  # a store type without clone(): share the main thread's connection
        watcher_store = store
    rank = accelerator.process_index
    watcher = FailureWatcher(watcher_store, rank, poll_seconds).start()
    try:
        yield
    except BaseException as error:
        watcher.stop()
        with contextlib.suppress(Exception):  # never hide the original error behind a store problem
            publish_failure(store, rank, error, accelerator.num_processes - 1, wait_seconds)
        raise
    watcher.stop()
    accelerator.wait_for_everyone()
