"""What the trainer and the example scripts need to know about how they were launched.

accelerate is the distributed engine; this module only answers questions accelerate leaves to the caller.
"""

from __future__ import annotations

import os

import torch


def is_multiprocess_cpu_run() -> bool:
    """Whether this is a multi-process launch (torchrun) on a machine without a GPU.

    accelerate sets up such a run (gloo) only when told it runs on the CPU: pass this as ``cpu=`` to
    ``Accelerator`` / ``PartialState``, including in scripts that touch ``PartialState`` before the trainer.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
