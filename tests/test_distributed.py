"""Two CPU processes (torchrun, gloo): prompts are sharded and both ranks end with identical weights."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


def test_two_process_training(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               os.path.join(os.path.dirname(__file__), "distributed_run.py"), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = [json.load(open(tmp_path / f"rank_{r}.json")) for r in range(2)]
    assert all(r["num_processes"] == 2 and "MULTI_CPU" in r["distributed_type"] for r in ranks)
    # 2 iterations x 1 prompt per process: each rank saw its own prompts, disjoint from the other's.
    assert len(ranks[0]["prompts"]) == len(ranks[1]["prompts"]) == 2
    assert not set(ranks[0]["prompts"]) & set(ranks[1]["prompts"])
    # Metrics are gathered: both ranks log the same global numbers.
    assert ranks[0]["log_history"][-1]["reward/weighted_mean"] == ranks[1]["log_history"][-1]["reward/weighted_mean"]
    assert ranks[0]["log_history"][-1]["transformer_evaluations"] == 2 * (
        ranks[0]["log_history"][-1]["transformer_evaluations"] // 2)

    weights = [torch.load(tmp_path / f"weights_{r}.pt") for r in range(2)]
    assert weights[0].keys() == weights[1].keys()
    moved = False
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
        moved |= bool(weights[0][name].abs().sum() > 0) and "lora_B" in name
    assert moved, "the LoRA did not train"
    assert (tmp_path / "checkpoint-2" / "trainable_params.safetensors").is_file()
    assert (tmp_path / "checkpoint-2" / "rollout_generator_1.pt").is_file()
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").is_file()
