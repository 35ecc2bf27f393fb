"""The cost of verifying checkpoints by content: hashing a LoRA-sized checkpoint when it is saved and again
before it is resumed.

    python benchmarks/checkpoint_hashing.py [--mib 75] [--repeats 3]

Writes a checkpoint shaped like a LoRA run's (``trainable_params.safetensors`` and the
``pytorch_lora_weights.safetensors`` copy of ``--mib`` MiB each, an ``optimizer.bin`` twice that: Adam's two
moments, a rollout generator and ``trainer_state.json``) into a temporary directory, then times
``write_manifest`` (hash every file, at save time), ``verify`` with the manifest (at resume time) and, for
comparison, ``verify`` without it (the structural checks of checkpoints written before manifests). The files
were just written, so they are read from the page cache: a cold read from disk adds the disk's read time.
Prints one line per repeat.
"""

import argparse
import logging
import os
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trl_flow_egrpo import checkpoints  # noqa: E402


def write_lora_sized_checkpoint(checkpoint: str, mib: int) -> int:
    """Write the files of a LoRA checkpoint with ``mib`` MiB of float32 parameters; returns the bytes written."""
    os.makedirs(checkpoint)
    params = {f"lora_{i}": torch.randn(1024, 256) for i in range(mib)}  # 1 MiB each
    save_file(params, os.path.join(checkpoint, checkpoints.TRAINABLE_PARAMS))
    save_file(params, os.path.join(checkpoint, "pytorch_lora_weights.safetensors"))
    moments = {"exp_avg": params, "exp_avg_sq": {name: value.square() for name, value in params.items()}}
    torch.save(moments, os.path.join(checkpoint, "optimizer.bin"))
    torch.save(torch.Generator().get_state(), checkpoints.generator_file(checkpoint, 0))
    checkpoints.write_trainer_state(checkpoint, checkpoints.TrainerState(iteration=1), {})
    return sum(os.path.getsize(os.path.join(checkpoint, name)) for name in os.listdir(checkpoint))


def seconds(function, *args) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def main(argv=None) -> None:
    """Time the manifest's writing and checking (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=75, help="MiB of trainable parameters (the checkpoint: 4x)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    logging.getLogger(checkpoints.__name__).setLevel(logging.ERROR)  # the no-manifest warning, expected here
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = os.path.join(directory, "checkpoint-1")
        size_mib = write_lora_sized_checkpoint(checkpoint, args.mib) / 2**20
        for repeat in range(args.repeats):
            write = seconds(checkpoints.write_manifest, checkpoint)
            verify = seconds(checkpoints.verify, checkpoint)
            manifest = os.path.join(checkpoint, checkpoints.MANIFEST)
            os.rename(manifest, manifest + ".off")
            structural = seconds(checkpoints.verify, checkpoint)
            os.rename(manifest + ".off", manifest)
            print(
                f"repeat {repeat + 1}: {size_mib:.0f} MiB checkpoint: write_manifest {write:.2f} s, verify with the "
                f"manifest {verify:.2f} s ({size_mib / verify:.0f} MiB/s), structural checks only {structural:.2f} s"
            )


if __name__ == "__main__":
    main()
