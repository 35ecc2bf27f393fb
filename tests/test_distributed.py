"""Two CPU processes (gloo): DDP, FSDP2 and DeepSpeed ZeRO-2/3 train the same model, checkpoint and resume
exactly; the learning-rate schedule and the evaluation do not depend on the process count; a failure on one
rank stops the other within seconds. ``distributed_run.py`` is the script each process runs."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import get_scheduler

pytestmark = pytest.mark.slow

sys.path.insert(0, os.path.dirname(__file__))
import distributed_run  # noqa: E402

RUN_SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_run.py")
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install deepspeed)"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(output_dir, scenario: str, timeout: float = 400) -> list[dict]:
    """Run ``distributed_run.py`` on 2 processes with torchrun; returns each rank's record."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        RUN_SCRIPT,
        str(output_dir),
        scenario,
    ]
    result = subprocess.run(
        command,
        env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return [json.load(open(output_dir / f"rank_{r}.json")) for r in range(2)]


def scenario_run(tmp_path_factory, scenario):
    output_dir = tmp_path_factory.mktemp(scenario)
    ranks = launch(output_dir, scenario)
    weights = [torch.load(output_dir / f"weights_{r}.pt") for r in range(2)]
    return output_dir, ranks, weights


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return scenario_run(tmp_path_factory, "ddp")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    return scenario_run(tmp_path_factory, "fsdp")


def expected_learning_rates(config, steps_per_iteration: int) -> list[float]:
    """The learning rate after each iteration when the schedule advances once per optimizer step (what a
    single process does)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    scheduler = get_scheduler(
        config.lr_scheduler_type,
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=config.max_steps * steps_per_iteration,
    )
    rates = []
    for _ in range(config.max_steps):
        for _ in range(steps_per_iteration):
            optimizer.step()
            scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    return rates


def assert_schedule_and_resume(output_dir, ranks, weights, scenario):
    """Learning rate per iteration as on one process; the resumed run ends exactly where the uninterrupted one
    did (same learning rates, same weights); every rank holds the same weights."""
    config = distributed_run.run_config(scenario, output_dir)
    expected = expected_learning_rates(config, ranks[0]["optimizer_steps_per_iteration"])
    assert len(set(expected)) > 2, "the schedule must not be constant"
    for rank in ranks:
        assert [log["learning_rate"] for log in rank["log_history"]] == pytest.approx(expected, rel=1e-9)
        # The resumed run restores iterations 1-2 from the checkpoint and trains 3-4 exactly as the first run did.
        assert without_timings(rank["resumed_log_history"]) == without_timings(rank["log_history"])
    trained, resumed = weights[0]["trained"], weights[0]["resumed"]
    if trained:
        assert trained.keys() == resumed.keys() == weights[1]["trained"].keys()
        for name in trained:
            assert torch.equal(trained[name], resumed[name]), name
            assert torch.equal(trained[name], weights[1]["trained"][name]), name
        assert any("lora_B" in name and trained[name].abs().sum() > 0 for name in trained), "the LoRA did not train"


def without_timings(log_history: list[dict]) -> list[dict]:
    """The logged metrics without the wall-clock times (which differ between processes and runs)."""
    return [{key: value for key, value in log.items() if not key.startswith("time/")} for log in log_history]


def assert_same_weights(a: dict, b: dict, atol: float):
    """Two backends trained the same model: the same weights up to float reduction order."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def test_ddp_trains_shards_prompts_and_resumes_exactly(ddp_run):
    output_dir, ranks, weights = ddp_run
    assert all(r["num_processes"] == 2 and "MULTI_CPU" in r["distributed_type"] for r in ranks)
    # Every iteration, each rank trains on its own 2 prompts; 2 iterations of 2 x 2 prompts make one epoch.
    assert len(ranks[0]["prompts"]) == len(ranks[1]["prompts"]) == 4
    for prompts_0, prompts_1 in zip(ranks[0]["prompts"], ranks[1]["prompts"], strict=True):
        assert len(prompts_0) == len(prompts_1) == 2 and not set(prompts_0) & set(prompts_1)
    first_epoch = [prompt for rank in ranks for prompts in rank["prompts"][:2] for prompt in prompts]
    assert sorted(first_epoch) == sorted(distributed_run.TRAIN_PROMPTS)
    # Metrics are gathered: both ranks log the same global numbers.
    assert without_timings(ranks[0]["log_history"]) == without_timings(ranks[1]["log_history"])
    # Exactly the transformer rows of 2 processes x 2 prompts: T for the anchor, G x (T - end) per merged step.
    steps = ranks[0]["num_inference_steps"]
    per_prompt = steps + 3 * sum(steps - (start + length) for start, length in ranks[0]["merge_plan"])
    assert all(log["trajectory_evaluations"] == 2 * 2 * per_prompt for log in ranks[0]["log_history"])
    assert_schedule_and_resume(output_dir, ranks, weights, "ddp")
    assert (output_dir / "checkpoint-2" / "trainable_params.safetensors").is_file()
    assert (output_dir / "checkpoint-2" / "rollout_generator_1.pt").is_file()
    assert (output_dir / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_evaluate_on_two_processes_drops_the_padding(ddp_run, tmp_path):
    """3 eval prompts on 2 processes (padded to 4): the metrics and the image grid are exactly the
    single-process ones."""
    from trl_flow_egrpo import EGRPOTrainer
    from trl_flow_egrpo.tiny import build_tiny_flux_pipeline

    output_dir, ranks, _ = ddp_run
    single = EGRPOTrainer(
        distributed_run.run_config("ddp", tmp_path),
        build_tiny_flux_pipeline(seed=0),
        [lambda images, prompts, **columns: images.mean(dim=(1, 2, 3))],
        Dataset.from_dict({"prompt": distributed_run.TRAIN_PROMPTS}),
        eval_dataset=Dataset.from_dict({"prompt": distributed_run.EVAL_PROMPTS, "index": [0, 1, 2]}),
        eval_reward_fns=[distributed_run.index_reward, distributed_run.brightness],
    )
    expected = single.evaluate()
    for rank in ranks:
        evaluation = rank["evaluation"]
        # Positions 0, 1, 2 once each: a counted padding row (a second 2) would give mean 1.25, std 0.96.
        assert evaluation["eval/index_reward/mean"] == 1.0 and evaluation["eval/index_reward/std"] == 1.0
        assert evaluation["eval/brightness/mean"] == pytest.approx(expected["eval/brightness/mean"], abs=1e-6)
        assert evaluation["eval/brightness/std"] == pytest.approx(expected["eval/brightness/std"], abs=1e-6)
    grid, single_grid = (np.asarray(Image.open(path / "eval_grid.png"), dtype=int) for path in (output_dir, tmp_path))
    assert grid.shape == single_grid.shape
    assert np.abs(grid - single_grid).max() <= 1, "the gathered images are not the single-process ones, in order"


def test_fsdp2_trains_like_ddp_from_the_main_process_weights(fsdp_run, ddp_run):
    output_dir, ranks, weights = fsdp_run
    assert all(r["num_processes"] == 2 and "FSDP" in r["distributed_type"] for r in ranks)
    # fsdp_cpu_ram_efficient_loading: only rank 0 loaded the weights; rank 1's placeholder was overwritten.
    assert [r["loaded_real_weights"] for r in ranks] == [True, False]
    assert_schedule_and_resume(output_dir, ranks, weights, "fsdp")
    assert_same_weights(weights[0]["trained"], ddp_run[2][0]["trained"], atol=1e-5)
    for rank in ranks:  # sampled (before training) with the main process's weights on both ranks
        assert rank["evaluation"] == pytest.approx(ddp_run[1][0]["evaluation"], abs=1e-6)
    # A non-final micro-batch leaves this rank's shard of the gradient (half the elements), not the
    # unsharded gradient that no_sync holds back until the last micro-batch.
    for rank in ranks:
        held = rank["sharded_gradients"]
        assert held["accumulation_context"] == pytest.approx(held["full"] / 2, rel=0.05)
        assert held["no_sync"] == 0
    assert (output_dir / "final" / "pytorch_lora_weights.safetensors").is_file()


@needs_deepspeed
def test_deepspeed_zero2_trains_like_ddp(tmp_path_factory, ddp_run):
    output_dir, ranks, weights = scenario_run(tmp_path_factory, "deepspeed2")
    assert all(r["num_processes"] == 2 and "DEEPSPEED" in r["distributed_type"] for r in ranks)
    assert_schedule_and_resume(output_dir, ranks, weights, "deepspeed2")
    assert_same_weights(weights[0]["trained"], ddp_run[2][0]["trained"], atol=1e-5)
    assert_loadable_lora(output_dir / "final", weights[0]["trained"])


@needs_deepspeed
def test_deepspeed_zero3_full_fine_tune_gathers_saves_and_resumes(tmp_path_factory):
    from diffusers import FluxTransformer2DModel

    from trl_flow_egrpo.tiny import build_tiny_flux_pipeline

    output_dir, ranks, weights = scenario_run(tmp_path_factory, "deepspeed3")
    assert all(r["num_processes"] == 2 and "DEEPSPEED" in r["distributed_type"] for r in ranks)
    assert_schedule_and_resume(output_dir, ranks, weights, "deepspeed3")
    trained = FluxTransformer2DModel.from_pretrained(output_dir / "final" / "transformer").state_dict()
    resumed = FluxTransformer2DModel.from_pretrained(output_dir / "resumed" / "final" / "transformer").state_dict()
    base = build_tiny_flux_pipeline(seed=0).transformer.state_dict()
    assert trained.keys() == base.keys()
    assert all(torch.equal(trained[name], resumed[name]) for name in trained)
    assert sum(not torch.equal(trained[name], base[name]) for name in trained) > len(trained) / 2


def assert_loadable_lora(directory, trained: dict):
    """The saved LoRA loads into a plain diffusers pipeline with the trained values."""
    from trl_flow_egrpo.tiny import build_tiny_flux_pipeline

    def without_adapter_name(name):  # "...lora_B.default.weight" (trainer) / "...lora_B.default_0.weight" (loaded)
        parts = name.split(".")
        return ".".join(parts[:-2] + parts[-1:])

    pipeline = build_tiny_flux_pipeline(seed=0)
    pipeline.load_lora_weights(str(directory))
    loaded = {without_adapter_name(name): p for name, p in pipeline.transformer.named_parameters() if "lora_" in name}
    assert loaded.keys() == {without_adapter_name(name) for name in trained}
    for name, value in trained.items():
        torch.testing.assert_close(loaded[without_adapter_name(name)], value, msg=name)


def test_failure_on_one_rank_stops_the_other_with_its_error(tmp_path):
    """Rank 1's reward raises and rank 1 stays alive (like a dead peer NCCL cannot detect): rank 0, waiting in
    the gradient all-reduce, must exit within seconds naming rank 1 and its error, not at the timeout."""
    port = free_port()
    processes = []
    for rank in range(2):
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, RUN_SCRIPT, str(tmp_path), "failure"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        rank0_output = processes[0].communicate(timeout=300)
        exited_at = time.time()
        failed_at = float((tmp_path / "failed_at").read_text())
        for _ in range(300):  # rank 1 has raised, printed its traceback, and sleeps
            if (tmp_path / "reported").exists():
                break
            time.sleep(0.1)
    finally:
        processes[1].kill()
    rank1_output = processes[1].communicate()
    assert processes[0].returncode == 1
    print(f"rank 0 exited {exited_at - failed_at:.1f} s after rank 1 failed")
    assert exited_at - failed_at < 20, f"rank 0 ran on for {exited_at - failed_at:.0f} s after rank 1 failed"
    assert (
        "stopping rank 0 because rank 1 failed with RuntimeError: reward server unreachable from rank 1"
        in rank0_output[1]
    ), rank0_output[1][-3000:]
    assert "RuntimeError: reward server unreachable from rank 1" in rank1_output[1]
