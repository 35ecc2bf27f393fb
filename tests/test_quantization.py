"""A quantized frozen base under the trained LoRA (trl_flow_egrpo.quantization; docs/memory-24gb.md).

torchao's weight-only int8 and float8 run on CPU, so the tiny FLUX pipeline trains with them here. NF4 needs a
GPU to load (diffusers' bitsandbytes quantizer refuses a machine without one): that test skips on CPU.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import plain_pipeline_images, tiny_trainer
from trl_flow_egrpo import EGRPOConfig
from trl_flow_egrpo.quantization import (
    is_lora_module,
    module_weight_bytes,
    nf4_pipeline_quantization_config,
    quantize_base_weights,
    tensor_bytes,
)
from trl_flow_egrpo.tiny import build_tiny_flux_pipeline

pytest.importorskip("torchao", reason="torchao is in the dev extra; without it only the error tests apply")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red apple", "a rose", "a car"]
STORAGE_DTYPE = {"int8-weight-only": torch.int8, "float8-weight-only": torch.float8_e4m3fn}


def base_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linear layers of ``model`` that are not LoRA matrices (the frozen base's)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not is_lora_module(name)
    }


def inner_dtypes(tensor: torch.Tensor) -> set[torch.dtype]:
    """dtypes of the tensors a torchao tensor subclass stores."""
    names, _ = tensor.__tensor_flatten__()
    return {getattr(tensor, name).dtype for name in names if getattr(tensor, name) is not None}


@pytest.mark.parametrize("method", ["int8-weight-only", "float8-weight-only"])
def test_quantized_base_trains_on_policy_with_float32_lora(tmp_path, method):
    # One optimizer step per iteration: every ratio is taken at the sampling policy, through the same quantized
    # forward as the rollouts (training micro-batches of 3 groups, sampling batches of 7 rows).
    trainer = tiny_trainer(
        tmp_path,
        quantization=method,
        rollout_batch_size=7,
        per_device_train_batch_size=3,
        max_steps=1,
        optimizer_step="iteration",
    )
    model = trainer.unwrapped_model
    linears = base_linears(model)
    assert linears and all(type(m.weight) not in (torch.Tensor, torch.nn.Parameter) for m in linears.values())
    assert all(STORAGE_DTYPE[method] in inner_dtypes(m.weight) for m in linears.values())
    assert all(not m.weight.requires_grad for m in linears.values())
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert lora and all(is_lora_module(name) and p.dtype == torch.float32 for name, p in lora.items())
    before = {name: p.detach().clone() for name, p in lora.items()}

    metrics = trainer.step()
    assert metrics["ratio/on_policy_max_abs_dev"] <= 1e-5
    assert metrics["grad_norm"] > 0
    # Every LoRA matrix received a gradient and moved (Adam moves each entry with a nonzero gradient by ~lr).
    assert all(not torch.equal(p, before[name]) for name, p in lora.items())


def test_quantized_base_stores_a_quarter_of_the_float32_weights(tmp_path):
    plain = tiny_trainer(tmp_path / "plain", max_steps=1).unwrapped_model
    quantized = tiny_trainer(tmp_path / "int8", quantization="int8-weight-only", max_steps=1).unwrapped_model
    plain_bytes = sum(tensor_bytes(m.weight) for m in base_linears(plain).values())
    int8_bytes = sum(tensor_bytes(m.weight) for m in base_linears(quantized).values())
    # 1 B per weight plus one scale per output row, against 4 B per float32 weight.
    assert 0.25 < int8_bytes / plain_bytes < 0.35, (int8_bytes, plain_bytes)
    assert module_weight_bytes(quantized) < 0.5 * module_weight_bytes(plain)


def test_lora_trained_on_a_quantized_base_loads_into_a_plain_pipeline(tmp_path):
    trainer = tiny_trainer(tmp_path, quantization="int8-weight-only", max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    prompts = PROMPTS
    trained = trainer.sample_images(prompts, seed=5)

    # The same LoRA on the same int8 base (quantized after loading, as the trainer does) gives the same images.
    requantized = build_tiny_flux_pipeline(seed=0)
    requantized.load_lora_weights(str(tmp_path / "lora"))
    quantize_base_weights(requantized.transformer, "int8-weight-only")
    torch.testing.assert_close(
        plain_pipeline_images(requantized, trainer, prompts, seed=5), trained, rtol=1e-5, atol=1e-5
    )
    # In an unquantized pipeline the LoRA loads too; it samples what the trainer's policy samples, up to the
    # int8 rounding of the base, and not what the base samples.
    plain = build_tiny_flux_pipeline(seed=0)
    plain.load_lora_weights(str(tmp_path / "lora"))
    loaded = plain_pipeline_images(plain, trainer, prompts, seed=5)
    base = plain_pipeline_images(build_tiny_flux_pipeline(seed=0), trainer, prompts, seed=5)
    assert (loaded - trained).abs().mean() < 0.5 * (base - trained).abs().mean()


def test_8bit_adamw_trains_the_lora_and_stores_uint8_moments(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (the quantization extra) runs 8-bit AdamW")
    trainer = tiny_trainer(
        tmp_path, quantization="int8-weight-only", optimizer="adamw_8bit", max_steps=1, weight_decay=0.0
    )
    optimizer = trainer.optimizer.optimizer  # inside accelerate's wrapper
    assert type(optimizer).__name__ == "AdamW8bit"
    assert optimizer.defaults["lr"] == trainer.config.learning_rate and optimizer.defaults["weight_decay"] == 0.0
    metrics = trainer.step()
    assert metrics["ratio/on_policy_max_abs_dev"] <= 1e-5 and metrics["grad_norm"] > 0
    trained = [p for p in trainer.unwrapped_model.parameters() if p.requires_grad]
    assert all(p in optimizer.state for p in trained)  # every LoRA matrix took an 8-bit AdamW step

    # bitsandbytes stores the moments of tensors of >= 4096 entries in 8 bits (the tiny LoRA's are smaller).
    from trl_flow_egrpo.quantization import adamw_8bit

    weight = torch.nn.Parameter(torch.randn(64, 128))
    adam = adamw_8bit([weight], like=torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3))
    weight.grad = torch.randn_like(weight)
    adam.step()
    state = adam.state[weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert tensor_bytes(state["state1"]) + tensor_bytes(state["state2"]) == 2 * weight.numel()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(quantization="int4"), "quantization='int4' is not allowed"),
        (dict(quantization="int8-weight-only", use_peft=False), "set use_peft=True"),
        (dict(optimizer="sgd"), "optimizer='sgd' is not allowed"),
    ],
)
def test_bad_quantization_settings_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        EGRPOConfig(**overrides)


def test_nf4_with_an_unquantized_transformer_says_how_to_load_it(tmp_path):
    pytest.importorskip("bitsandbytes", reason="the nf4 check needs bitsandbytes to get past the import")
    with pytest.raises(ValueError, match="nf4_pipeline_quantization_config"):
        tiny_trainer(tmp_path, quantization="nf4")


def test_sharded_quantized_base_is_refused():
    transformer = build_tiny_flux_pipeline(seed=0).transformer
    with pytest.raises(ValueError, match="cannot be combined with fsdp"):
        quantize_base_weights(transformer, "int8-weight-only", distributed_backend="fsdp")


@pytest.mark.parametrize(
    "module, method",
    [
        ("torchao.quantization", "int8-weight-only"),
        ("torchao.quantization", "float8-weight-only"),
        ("bitsandbytes", "nf4"),
    ],
)
def test_missing_quantization_library_names_the_extra(monkeypatch, module, method):
    transformer = build_tiny_flux_pipeline(seed=0).transformer  # diffusers imports what it needs first
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "trl-flow-egrpo\[quantization\]"'):
        quantize_base_weights(transformer, method)
    if module == "bitsandbytes":
        with pytest.raises(ImportError, match=r'pip install "trl-flow-egrpo\[quantization\]"'):
            nf4_pipeline_quantization_config()


def test_missing_bitsandbytes_for_8bit_adamw_names_the_extra(tmp_path, monkeypatch):
    pipeline = build_tiny_flux_pipeline(seed=0)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(
        ImportError,
        match=r"optimizer='adamw_8bit' needs the 'bitsandbytes' package.*"
        r'pip install "trl-flow-egrpo\[quantization\]"',
    ):
        tiny_trainer(tmp_path, pipeline=pipeline, optimizer="adamw_8bit")


def test_nf4_config_quantizes_the_transformer_only():
    pytest.importorskip("bitsandbytes")
    config = nf4_pipeline_quantization_config()
    assert config.quant_backend == "bitsandbytes_4bit" and config.components_to_quantize == ["transformer"]
    assert config.quant_kwargs["bnb_4bit_quant_type"] == "nf4"
    assert config.quant_kwargs["bnb_4bit_compute_dtype"] == torch.bfloat16


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="diffusers loads bitsandbytes NF4 models only on a GPU ('No GPU found. A GPU is needed for quantization.')",
)
def test_nf4_loaded_tiny_checkpoint_trains_on_policy(tmp_path):
    from diffusers import FluxPipeline

    pytest.importorskip("bitsandbytes")
    build_tiny_flux_pipeline(seed=0).save_pretrained(tmp_path / "tiny")
    pipeline = FluxPipeline.from_pretrained(
        tmp_path / "tiny", torch_dtype=torch.bfloat16, quantization_config=nf4_pipeline_quantization_config()
    )
    trainer = tiny_trainer(
        tmp_path / "out",
        pipeline=pipeline,
        quantization="nf4",
        max_steps=1,
        optimizer_step="iteration",
        mixed_precision="bf16",
    )
    metrics = trainer.step()
    assert metrics["ratio/on_policy_max_abs_dev"] <= 1e-3 and metrics["grad_norm"] > 0


def test_precomputed_run_prompts_keep_the_text_encoders_out_of_training(tmp_path):
    from trl_flow_egrpo.quantization import precompute_run_prompts

    trainer = tiny_trainer(
        tmp_path,
        quantization="int8-weight-only",
        prompt_cache_dir=str(tmp_path / "cache"),
        max_steps=2,
        eval_steps=2,
        eval_dataset=["a blue car", "a green field"],
    )
    encoded = precompute_run_prompts(trainer)
    assert 0 < encoded <= 2 * 2 + 2  # 2 prompts per iteration (repeats encode once) + 2 eval prompts
    trainer.train()
    assert trainer.prompt_encoder.num_encoded == encoded  # every prompt of the run came from the cache

    with pytest.raises(ValueError, match="set prompt_cache_dir"):
        precompute_run_prompts(tiny_trainer(tmp_path / "no-cache", max_steps=1))


def test_memory_model_counts_the_bytes_torchao_stores():
    # benchmarks/memory.py's formula for a quantized base, against a real int8 / float8 transformer (bf16 rest).
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import memory

    for method in ("int8-weight-only", "float8-weight-only"):
        transformer = build_tiny_flux_pipeline(seed=0, dtype=torch.bfloat16).transformer
        linears = base_linears(transformer).values()
        counts = dict(
            transformer=memory.parameter_count(transformer),
            transformer_linear_weights=sum(m.weight.numel() for m in linears),
            transformer_linear_rows=sum(m.out_features for m in linears),
        )
        expected = memory.quantized_transformer_bytes(counts, method)
        assert module_weight_bytes(quantize_base_weights(transformer, method)) == expected, method


def test_gpu_recipe_script_runs_the_24gb_recipe_tiny_on_cpu():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    run = subprocess.run(
        [sys.executable, "benchmarks/gpu_recipe_24gb.py", "--tiny", "--device", "cpu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["quantization"] == "int8-weight-only" and result["optimizer"] == "adamw_8bit"
    assert result["on_policy_max_abs_dev"] <= 1e-5
    assert result["precompute_prompts_encoded"] > 0 and result["prompts_encoded_during_step"] == 0
    assert result["config"]["num_generations"] == 2 and result["step"]["peak_reserved_gib"] is None  # CPU: no peak


def test_rounding_errors_rank_the_formats():
    pytest.importorskip("bitsandbytes")
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from gpu_recipe_24gb import rounding_errors

    errors = rounding_errors(size=256)
    # int8 keeps 8 bits of mantissa range per row, float8 e4m3 3 mantissa bits, NF4 16 levels per block of 64.
    assert 0 < errors["int8-weight-only"] < errors["float8-weight-only"] < errors["nf4"] < 0.2, errors


def test_load_pipeline_hands_the_quantization_config_to_from_pretrained(monkeypatch):
    import diffusers

    from trl_flow_egrpo import registry

    seen = {}
    monkeypatch.setattr(
        diffusers.DiffusionPipeline,
        "from_pretrained",
        lambda name, **kwargs: seen.update(name=name, **kwargs) or "pipeline",
    )
    marker = object()  # what examples/hpd.py passes for quantization='nf4' (building the real one needs bitsandbytes)
    assert registry.load_pipeline("some/model", torch.bfloat16, quantization_config=marker) == "pipeline"
    assert seen == {"name": "some/model", "torch_dtype": torch.bfloat16, "quantization_config": marker}
    with pytest.raises(ValueError, match="built in memory.*int8-weight-only"):
        registry.load_pipeline("tiny", torch.float32, quantization_config=marker)
