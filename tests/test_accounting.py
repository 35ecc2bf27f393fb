"""Honest sampling costs: ``transformer_rows`` are the rows the transformer's forward batches hold (two per trajectory
under true classifier-free guidance) and what MFU counts, ``trajectory_evaluations`` one per trajectory per step;
and the model's dtype is read once per phase, not at every velocity or decode call."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer, plan_merges  # noqa: E402
from trl_flow_egrpo.adapters import get_adapter, select_rows  # noqa: E402
from trl_flow_egrpo.metrics import DEPRECATED_ALIASES, sampling_cost_metrics  # noqa: E402
from trl_flow_egrpo.rewards import ColorReward  # noqa: E402
from trl_flow_egrpo.rollout import sample_rollouts  # noqa: E402
from trl_flow_egrpo.tiny import (  # noqa: E402
    build_tiny_flux2_klein_pipeline,
    build_tiny_flux2_pipeline,
    build_tiny_flux_pipeline,
    build_tiny_qwenimage_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_wan_pipeline,
    build_tiny_zimage_pipeline,
)

PROMPTS = ["a red apple", "a fire truck", "a cat on a mat", "sunset over the sea"]

# family: (pipeline builder, adapter arguments, guidance scale with true CFG or None (the family has none), without)
FAMILIES = {
    "flux": (build_tiny_flux_pipeline, dict(height=64, width=64, max_sequence_length=32), None, 3.5),
    "flux2-dev": (build_tiny_flux2_pipeline, dict(height=32, width=32, max_sequence_length=32), None, 4.0),
    "flux2-klein-distilled": (
        lambda: build_tiny_flux2_klein_pipeline(is_distilled=True),
        dict(height=32, width=32, max_sequence_length=48),
        None,
        4.0,
    ),
    "flux2-klein-base": (build_tiny_flux2_klein_pipeline, dict(height=32, width=32, max_sequence_length=48), 4.0, 1.0),
    "sd3": (build_tiny_sd3_pipeline, dict(height=64, width=64, max_sequence_length=32), 4.5, 1.0),
    "qwenimage": (build_tiny_qwenimage_pipeline, dict(height=32, width=32, max_sequence_length=32), 4.0, 1.0),
    "zimage": (build_tiny_zimage_pipeline, dict(height=32, width=32, max_sequence_length=32), 4.0, 0.0),
    "wan": (build_tiny_wan_pipeline, dict(height=32, width=32, num_frames=5, max_sequence_length=32), 5.0, 1.0),
}


def count_forward_rows(module: torch.nn.Module) -> list[int]:
    """Append the batch rows of every forward of ``module`` to the returned list: its ``hidden_states`` (or first
    argument: Z-Image's list of per-sample tensors) has one entry per row."""
    rows = []

    def hook(_, args, kwargs):
        rows.append(len(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]))

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return rows


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_each_family_declares_the_rows_its_transformer_sees(family):
    builder, arguments, cfg_scale, plain_scale = FAMILIES[family]
    pipe = builder()
    rows = count_forward_rows(pipe.transformer)
    for guidance_scale, expected in ((cfg_scale, 2), (plain_scale, 1)):
        if guidance_scale is None:
            continue
        adapter = get_adapter(pipe, guidance_scale=guidance_scale, **arguments)
        conditioning = adapter.encode_prompts(PROMPTS[:2])
        latents = adapter.initial_noise(3, torch.Generator().manual_seed(0))
        timesteps = adapter.schedule(4, shift=None).timesteps[:3]
        rows.clear()
        adapter.velocity(pipe.transformer, latents, timesteps, select_rows(conditioning, torch.tensor([0, 1, 1])))
        assert adapter.transformer_rows_per_evaluation == expected, (family, guidance_scale)
        assert sum(rows) == 3 * expected, (family, guidance_scale, rows)


def sd3_trainer(output_dir, guidance_scale: float, **overrides) -> EGRPOTrainer:
    """An EGRPOTrainer on the tiny SD3 pipeline: 64x64, 4 steps (2 trained), 3 rollouts per group, float32."""
    values = dict(
        output_dir=str(output_dir),
        height=64,
        width=64,
        max_sequence_length=32,
        num_inference_steps=4,
        num_active_steps=2,
        num_generations=3,
        prompts_per_device=2,
        guidance_scale=guidance_scale,
        negative_prompt="blurry" if guidance_scale > 1 else "",
        mixed_precision="no",
        lora_r=4,
        lora_alpha=4,
        rollout_batch_size=5,
        per_device_train_batch_size=2,
        save_steps=0,
        max_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return EGRPOTrainer(
        EGRPOConfig(**values), build_tiny_sd3_pipeline(seed=0), [ColorReward()], Dataset.from_dict({"prompt": PROMPTS})
    )


@pytest.mark.parametrize("guidance_scale, rows_per_evaluation", [(4.5, 2), (1.0, 1)], ids=["cfg", "no-cfg"])
def test_logged_rows_are_the_forward_rows_and_mfu_counts_them(tmp_path, guidance_scale, rows_per_evaluation):
    trainer = sd3_trainer(tmp_path, guidance_scale, peak_tflops=2.0)
    rows = count_forward_rows(trainer.pipeline.transformer)
    sampling_rows = []
    generate = trainer.generate

    def counted_generate(prompts, images=None):  # the forward rows of the sampling phase, apart from the update's
        rows.clear()
        rollouts = generate(prompts, images)
        sampling_rows.append(sum(rows))
        rows.clear()
        return rollouts

    trainer.generate = counted_generate
    metrics = trainer.step()
    update_rows = sum(rows)  # no compile (no recomputation), one inner epoch: the update's forwards only

    assert metrics["transformer_rows"] == sampling_rows[0] > 0
    assert metrics["transformer_rows"] == rows_per_evaluation * metrics["trajectory_evaluations"]
    assert metrics["trajectory_evaluations"] == trainer.config.prompts_per_device * trainer.evaluations_per_prompt()
    assert metrics["transformer_evaluations"] == metrics["trajectory_evaluations"]  # the deprecated alias
    assert metrics["time/sampling_rows_per_s"] == pytest.approx(metrics["transformer_rows"] / metrics["time/sampling"])
    assert metrics["time/update_rows_per_s"] * metrics["time/update"] == pytest.approx(update_rows)
    # MFU: forward rows times the FLOPs of one forward row (a single-row velocity without guidance).
    one_row = get_adapter(trainer.pipeline, height=64, width=64, guidance_scale=1.0, max_sequence_length=32)
    latents = one_row.initial_noise(1, torch.Generator().manual_seed(0))
    flops = trainer.flops_per_row
    assert flops == one_row_flops(one_row, trainer, latents) > 0
    expected_mfu = metrics["transformer_rows"] * flops / metrics["time/sampling"] / 2e12
    assert metrics["time/sampling_mfu"] == pytest.approx(expected_mfu)


def one_row_flops(adapter, trainer, latents) -> int:
    """FLOPs of ``adapter.velocity`` on one sample, counted on the meta device, without any division."""
    from trl_flow_egrpo.acceleration import transformer_flops_per_row

    assert adapter.transformer_rows_per_evaluation == 1
    conditioning = adapter.encode_prompts(PROMPTS[:1])
    return transformer_flops_per_row(
        adapter, trainer.unwrapped_model, latents, trainer.schedule.timesteps[:1], conditioning
    )


def test_sampling_cost_metrics_and_deprecated_aliases():
    metrics = sampling_cost_metrics(trajectory_evaluations=48, transformer_rows=96, num_rollouts=12)
    assert metrics == {
        "trajectory_evaluations": 48,
        "transformer_rows": 96,
        "trajectory_evaluations_per_rollout": 4.0,
        "transformer_rows_per_rollout": 8.0,
        "transformer_evaluations": 48,
        "transformer_evaluations_per_rollout": 4.0,
    }
    assert set(DEPRECATED_ALIASES.values()) <= set(metrics)


def count_dtype_reads(monkeypatch, module: torch.nn.Module) -> list[int]:
    """Count the reads of ``module``'s class ``dtype`` property (diffusers' walk over all submodules)."""
    reads = []
    prop = type(module).dtype
    monkeypatch.setattr(type(module), "dtype", property(lambda self: reads.append(1) or prop.fget(self)))
    return reads


@torch.no_grad()
def test_sampling_reads_the_dtypes_once_per_phase(monkeypatch):
    pipe = build_tiny_sd3_pipeline()
    adapter = get_adapter(pipe, height=64, width=64, guidance_scale=4.5, max_sequence_length=32)
    transformer_reads = count_dtype_reads(monkeypatch, pipe.transformer)
    vae_reads = count_dtype_reads(monkeypatch, pipe.vae)
    schedule = adapter.schedule(4, shift=None)
    conditioning = adapter.encode_prompts(PROMPTS[:2])
    rows = count_forward_rows(pipe.transformer)
    rollouts = sample_rollouts(
        adapter,
        pipe.transformer,
        schedule,
        plan_merges(schedule.sigmas, 0.7, 2.2, 2, merge=None),
        conditioning,
        adapter.initial_noise(2, torch.Generator().manual_seed(0)),
        num_generations=2,
        noise_level=0.7,
        generator=torch.Generator().manual_seed(1),
        batch_size=3,
        decode_batch_size=1,
    )
    assert rollouts.num_model_calls > 4 and len(rollouts.images) > 1  # many transformer and VAE calls...
    assert transformer_reads == [1] and vae_reads == [1]  # ...one read of each dtype
    assert rollouts.num_transformer_rows == sum(rows) == 2 * rollouts.num_evaluations
    # Outside a phase every call reads it (what sampling did before).
    adapter.velocity(pipe.transformer, rollouts.step_latents[:2], schedule.timesteps[:2], conditioning)
    adapter.velocity(pipe.transformer, rollouts.step_latents[:2], schedule.timesteps[:2], conditioning)
    assert transformer_reads == [1, 1, 1]


def test_a_phase_rereads_the_dtype_after_a_cast():
    pipe = build_tiny_sd3_pipeline()
    adapter = get_adapter(pipe, height=64, width=64, guidance_scale=1.0, max_sequence_length=32)
    with adapter.phase():
        assert adapter.transformer_dtype == torch.float32
        pipe.transformer.to(torch.bfloat16)  # within a phase the first read stands (casts belong between phases)
        with adapter.phase():  # a nested phase is the outer one
            assert adapter.transformer_dtype == torch.float32
    with adapter.phase():
        assert adapter.transformer_dtype == torch.bfloat16 == adapter.transformer.dtype
    assert adapter.transformer_dtype == torch.bfloat16 and adapter._phase_reads is None


def test_a_training_step_reads_the_dtype_once_per_phase(tmp_path, monkeypatch):
    trainer = sd3_trainer(tmp_path, 4.5)
    reads = count_dtype_reads(monkeypatch, trainer.pipeline.transformer)
    metrics = trainer.step()
    # Sampling (anchors, branches, decoding) and the update: one read each, for dozens of velocity calls.
    assert metrics["transformer_calls"] > 4 and len(reads) == 2
