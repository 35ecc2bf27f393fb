"""Speed switches (regional compilation, attention backend, LoRA input cast, fused AdamW) and the throughput,
MFU and memory metrics (issue 11, docs/performance.md)."""

import logging

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import tiny_config, tiny_trainer
from trl_flow_egrpo import acceleration
from trl_flow_egrpo.adapters import select_rows
from trl_flow_egrpo.metrics import throughput_metrics


def lora_layers(model):
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


@pytest.fixture
def restore_attention_backend():
    """Setting a model's attention backend also sets diffusers' process-wide active one: restore it."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active, _ = _AttentionBackendRegistry.get_active_backend()
    yield
    _AttentionBackendRegistry.set_active_backend(active)


def test_phase_peaks_of_a_whole_step_are_the_largest_phase_values():
    metrics = {
        "memory/sampling_peak_allocated_gib": 3.0,
        "memory/update_peak_allocated_gib": 5.0,
        "memory/update_peak_reserved_gib": 6.0,
        "time/update": 9.0,
    }
    assert acceleration.PhasePeakMemory.overall(metrics) == 5.0
    assert acceleration.PhasePeakMemory.overall(metrics, "reserved") == 6.0
    assert acceleration.PhasePeakMemory.overall({"time/update": 1.0}) is None
    peaks = acceleration.PhasePeakMemory(torch.device("cpu"))
    with peaks("sampling"):
        pass
    assert peaks.values == {}  # allocator statistics are CUDA's


def test_throughput_metrics_are_the_counts_over_the_phase_times(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=1, peak_tflops=2.0)
    metrics = trainer.step()
    rows = metrics["transformer_rows"]  # one process: its own rows
    assert rows > 0
    assert metrics["time/sampling_rows_per_s"] == pytest.approx(rows / metrics["time/sampling"])
    # The update forwards each (prompt, merged step) group's latent once.
    update_rows = metrics["time/update_rows_per_s"] * metrics["time/update"]
    assert update_rows == pytest.approx(len(trainer.merge_plan) * trainer.config.prompts_per_device)
    flops = trainer.flops_per_row
    assert metrics["time/sampling_mfu"] == pytest.approx(rows * flops / metrics["time/sampling"] / 2e12)
    assert not any(key.startswith("memory/") for key in metrics)  # peaks are CUDA allocator statistics


def test_no_mfu_without_a_known_peak_on_cpu(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=1)
    metrics = trainer.step()
    assert metrics["time/sampling_rows_per_s"] > 0 and metrics["time/update_rows_per_s"] > 0
    assert "time/sampling_mfu" not in metrics and trainer.flops_per_row is None
    assert acceleration.peak_tflops(torch.device("cpu")) is None
    assert acceleration.peak_tflops(torch.device("cpu"), override=3.5) == 3.5


def test_throughput_metrics_formula():
    metrics = throughput_metrics(100, 4.0, 6, 3.0, flops_per_row=10**12, peak_tflops=50.0)
    assert metrics == pytest.approx(
        {"time/sampling_rows_per_s": 25.0, "time/update_rows_per_s": 2.0, "time/sampling_mfu": 0.5}
    )
    assert "time/sampling_mfu" not in throughput_metrics(100, 4.0, 6, 3.0, flops_per_row=10**12)


def test_flops_per_row_on_meta_equal_a_real_forward_of_the_base_model(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=1)
    rollouts = trainer.generate(["a red apple"])
    first = torch.tensor([0])
    latents = rollouts.step_latents[first]
    timesteps = trainer.schedule.timesteps[rollouts.step_start[first]]
    conditioning = select_rows(rollouts.conditioning, rollouts.step_prompt[first])
    counted = acceleration.transformer_flops_per_row(
        trainer.adapter, trainer.unwrapped_model, latents, timesteps, conditioning
    )
    model = trainer.unwrapped_model
    model.disable_adapters()
    # The math kernel (matmuls) because FlopCounterMode has no formula for the CPU's fused attention kernel.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        trainer.adapter.velocity(model, latents, timesteps, conditioning)
    model.enable_adapters()
    assert counted == counter.get_total_flops() > 0


def test_lora_input_cast_is_off_under_mixed_precision_and_changes_no_value(tmp_path):
    trainer = tiny_trainer(
        tmp_path,
        max_steps=1,
        mixed_precision="bf16",
        rollout_batch_size=7,
        per_device_train_batch_size=3,
        optimizer_step="iteration",
    )
    model = trainer.unwrapped_model
    layers = lora_layers(model)
    assert layers and not any(layer.cast_input_dtype_enabled for layer in layers)
    assert any("LoRA input cast off" in line for line in trainer.speed_switches)
    rollouts = trainer.generate(["a red apple", "a rose"])
    steps = torch.arange(len(rollouts.step_start))
    inputs = (
        rollouts.step_latents,
        trainer.schedule.timesteps[rollouts.step_start],
        select_rows(rollouts.conditioning, rollouts.step_prompt[steps]),
    )

    def velocity():
        with torch.no_grad(), trainer.accelerator.autocast():
            return trainer.adapter.velocity(model, *inputs)

    without_cast = velocity()
    acceleration.set_lora_input_cast(model, True)
    with_cast = velocity()
    acceleration.set_lora_input_cast(model, False)
    torch.testing.assert_close(without_cast, with_cast, rtol=0, atol=0)  # bf16 -> fp32 -> bf16 is exact
    assert trainer.step()["ratio/on_policy_max_abs_dev"] < 1e-5


def test_lora_input_cast_stays_on_without_mixed_precision(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=1, mixed_precision="no")
    assert all(layer.cast_input_dtype_enabled for layer in lora_layers(trainer.unwrapped_model))


def test_attention_backend_is_set_logged_and_on_policy(tmp_path, caplog, restore_attention_backend):
    trainer = tiny_trainer(
        tmp_path,
        max_steps=1,
        attention_backend="_native_math",
        rollout_batch_size=7,
        per_device_train_batch_size=3,
        optimizer_step="iteration",
    )
    backends = {
        module.processor._attention_backend
        for module in trainer.unwrapped_model.modules()
        if hasattr(getattr(module, "processor", None), "_attention_backend")
    }
    assert backends == {"_native_math"}
    with caplog.at_level(logging.INFO, logger="trl_flow_egrpo.trainer"):
        trainer._log_start()
    assert "attention backend _native_math" in caplog.text
    assert trainer.step()["ratio/on_policy_max_abs_dev"] < 1e-5


def test_bad_speed_settings_are_refused_with_the_allowed_values(tmp_path):
    with pytest.raises(ValueError, match="attention_backend='flash-attention' is not allowed.*'native'"):
        tiny_config(tmp_path, attention_backend="flash-attention")
    with pytest.raises(ValueError, match="compile_mode='fast' is not allowed.*'default'"):
        tiny_config(tmp_path, compile_mode="fast")
    with pytest.raises(ValueError, match="peak_tflops=-1.0 is not allowed"):
        tiny_config(tmp_path, peak_tflops=-1.0)
    with pytest.raises(ValueError, match="has no repeated blocks"):
        acceleration.compile_repeated_blocks(torch.nn.Linear(2, 2))


def test_repeated_blocks_are_the_models_or_every_module_list_child():
    from trl_flow_egrpo.tiny import build_tiny_flux_pipeline

    transformer = build_tiny_flux_pipeline(seed=0).transformer
    blocks = acceleration.repeated_blocks(transformer)
    assert len(blocks) == len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    stack = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU()]), torch.nn.Linear(2, 2))
    assert acceleration.repeated_blocks(stack) == list(stack[0])


def test_optimizer_is_adamw_from_the_config_and_unfused_on_cpu(tmp_path):
    config = tiny_config(tmp_path, learning_rate=3e-3, weight_decay=0.5)
    optimizer = acceleration.build_optimizer([torch.nn.Parameter(torch.zeros(3))], config)
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert group["lr"] == 3e-3 and group["weight_decay"] == 0.5 and not group["fused"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused AdamW is a CUDA kernel; no GPU here")
def test_optimizer_is_fused_on_cuda(tmp_path):
    optimizer = acceleration.build_optimizer([torch.nn.Parameter(torch.zeros(3, device="cuda"))], tiny_config(tmp_path))
    assert optimizer.param_groups[0]["fused"]


@pytest.mark.slow
def test_compiled_transformer_samples_and_trains_on_policy(tmp_path):
    """Regional compilation (inductor's C++ code on the CPU: minutes for the first compile) of the blocks that
    both sample and train: the first optimizer step's ratios stay 1 (sampling batches of 7 rows, training
    batches of 3 groups, so the compiled graphs differ in shape and in grad mode)."""
    trainer = tiny_trainer(
        tmp_path,
        max_steps=1,
        compile_transformer=True,
        mixed_precision="bf16",
        rollout_batch_size=7,
        per_device_train_batch_size=3,
        optimizer_step="iteration",
    )
    blocks = acceleration.repeated_blocks(trainer.unwrapped_model)
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert any("torch.compile of" in line for line in trainer.speed_switches)
    metrics = trainer.step()
    # Without the log-probabilities recomputed on the update's graph this measured 7e-5 (bf16, CPU).
    assert metrics["ratio/on_policy_max_abs_dev"] < 1e-5
    assert metrics["time/recompute_log_probs"] > 0
    assert metrics["trajectory_evaluations"] == 2 * trainer.evaluations_per_prompt()


def test_log_probs_recomputed_on_the_training_path_equal_the_sampled_ones_in_eager_mode(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=1, per_device_train_batch_size=3)
    rollouts = trainer.generate(["a red apple", "a rose"])
    sampled = rollouts.log_probs.clone()
    seconds = trainer._recompute_log_probs(rollouts, [torch.arange(len(rollouts.step_start))])
    assert seconds > 0
    torch.testing.assert_close(rollouts.log_probs, sampled, rtol=0, atol=1e-5)
