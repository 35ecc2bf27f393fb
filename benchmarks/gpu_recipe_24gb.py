"""Peak GPU memory of ``examples/recipes/flux_dev_lora_24gb.yaml`` (FLUX.1-dev, LoRA on an int8 base, 24 GB).

    python benchmarks/gpu_recipe_24gb.py --device cuda                # FLUX.1-dev shapes, random weights
    python benchmarks/gpu_recipe_24gb.py --device cuda --cap_gib 22   # also refuse the GPU's memory above 22 GiB
    python benchmarks/gpu_recipe_24gb.py --tiny --device cpu          # smoke test on a CPU (seconds)
    python benchmarks/gpu_recipe_24gb.py --rounding_errors            # each weight format's rounding error (CPU)

The models are ``benchmarks/gpu_iteration.py``'s (FLUX.1-dev's transformer, T5-XXL, CLIP-L and VAE with random
weights in bf16). The pipeline is built on the device; the trainer then quantizes the transformer as the recipe
says, and the allocator's cache is emptied before each measurement, so the peaks are the recipe's own. Two
phases are measured, as a 24 GB run goes through them:

* ``precompute``: :func:`trl_flow_egrpo.quantization.precompute_run_prompts` after ``EGRPOTrainer(...)``, the
  text encoders visiting the GPU beside the quantized transformer;
* ``trainer_step``: one ``trainer.step()`` (1 prompt, G=12, the paper's plan, 720x720) with ballast
  (``torch.empty`` bytes) standing in for the HPS reward model's fp16 weights, which stay on the GPU.

One JSON line is printed with the transformer's stored GiB, each phase's peak allocated / reserved GiB, the
step's seconds and on-policy max |r - 1|, the prompts encoded during the step (0: the text encoders stayed off
the GPU) and whether the larger reserved peak is within ``--target_gib``. ``benchmarks/gpu_probe.py`` can run the
same measurement as a section: ``from gpu_recipe_24gb import measure_recipe_24gb`` and log its result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_iteration import PROMPTS, TINY_RECIPE, build_trainer, flux_dev_shaped_pipeline, timed_step  # noqa: E402
from memory import REPO, build_on_meta, parameter_count  # noqa: E402

RECIPE_24GB = os.path.join(REPO, "examples", "recipes", "flux_dev_lora_24gb.yaml")
GIB = 2**30


def recipe_config(output_dir: str, device: str, tiny: bool = False, **overrides):
    """The ``EGRPOConfig`` of the 24 GB recipe for one measured iteration: no checkpoints, evaluation, trackers or
    Hub; the prompt cache in ``output_dir``; float32 on a CPU; ``tiny`` applies gpu_iteration's TINY_RECIPE."""
    from trl_flow_egrpo import EGRPOConfig

    with open(RECIPE_24GB) as f:
        recipe = yaml.safe_load(f)
    fields = {field.name for field in dataclasses.fields(EGRPOConfig)}
    values = {key: value for key, value in recipe.items() if key in fields}
    values |= dict(
        output_dir=output_dir,
        prompt_cache_dir=os.path.join(output_dir, "prompt-cache"),
        max_steps=1,
        save_steps=0,
        eval_steps=0,
        log_with=None,
        push_to_hub=False,
        disable_tqdm=True,
    )
    if not str(device).startswith("cuda"):
        values["mixed_precision"] = "no"
    return EGRPOConfig(**(values | (TINY_RECIPE if tiny else {}) | overrides))


def peak_gib(device: str) -> dict:
    """Peak allocated and reserved GiB since the last reset (None off CUDA)."""
    if not str(device).startswith("cuda"):
        return dict(peak_allocated_gib=None, peak_reserved_gib=None)
    torch.cuda.synchronize()
    return dict(
        peak_allocated_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2),
    )


def reset_peaks(device: str) -> None:
    """Empty the allocator's cache and reset the peaks, so the next phase's peaks are its own."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure_recipe_24gb(
    pipeline,
    device: str,
    ballast_bytes: int,
    output_dir: str,
    tiny: bool = False,
    target_gib: float = 22.0,
    cap_gib: float | None = None,
) -> dict:
    """Build the 24 GB recipe's trainer on ``pipeline``, precompute the run's prompts, run one step; returns the
    measurements (see the module docstring). ``pipeline`` is quantized in place.

    ``cap_gib`` (CUDA): once the trainer is built (the bf16 transformer replaced by its int8 weights and the text
    encoders moved to the CPU), refuse GPU memory above this many GiB, as a smaller card would.
    """
    from trl_flow_egrpo.quantization import module_weight_bytes, precompute_run_prompts

    trainer = build_trainer(pipeline, recipe_config(output_dir, device, tiny))
    reset_peaks(device)
    if cap_gib is not None and str(device).startswith("cuda"):
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total), device)
    encoded_before = precompute_run_prompts(trainer)
    precompute = peak_gib(device)

    ballast = torch.empty(ballast_bytes, dtype=torch.uint8, device=device)
    step = timed_step(trainer, device)  # resets the peaks itself
    step_peaks = peak_gib(device)
    del ballast
    config = trainer.config
    peaks = [value for value in (precompute["peak_reserved_gib"], step_peaks["peak_reserved_gib"]) if value is not None]
    return dict(
        transformer_stored_gib=round(module_weight_bytes(trainer.unwrapped_model) / GIB, 3),
        quantization=config.quantization,
        optimizer=config.optimizer,
        precompute_prompts_encoded=encoded_before,
        precompute=precompute,
        step_seconds=round(step["seconds"], 2),
        step=step_peaks,
        ballast_gib=round(ballast_bytes / GIB, 2),
        on_policy_max_abs_dev=step["ratio/on_policy_max_abs_dev"],
        prompts_encoded_during_step=trainer.prompt_encoder.num_encoded - encoded_before,
        transformer_rows=step["transformer_rows"],
        target_gib=target_gib,
        within_target=max(peaks) <= target_gib if peaks else None,
        config={
            key: getattr(config, key)
            for key in (
                "height",
                "num_generations",
                "num_inference_steps",
                "num_active_steps",
                "rollout_batch_size",
                "decode_batch_size",
                "gradient_checkpointing",
                "lora_r",
                "mixed_precision",
            )
        },
    )


def rounding_errors(size: int = 3072, std: float = 0.02, seed: int = 0) -> dict[str, float]:
    r"""Relative rounding error :math:`\|\hat W - W\|_F / \|W\|_F` of each base-weight format on a Gaussian
    ``size`` x ``size`` bf16 matrix (FLUX.1-dev's width, its weights' scale): torchao int8 and float8 weight-only
    (one scale per row), bitsandbytes NF4 (blocks of 64, double quantization). Runs on a CPU."""
    import bitsandbytes.functional as bnb
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(size, size, generator=generator) * std).to(torch.bfloat16)

    def error(approximation: torch.Tensor) -> float:
        return ((approximation.float() - weight.float()).norm() / weight.float().norm()).item()

    errors = {}
    configs = {"int8-weight-only": Int8WeightOnlyConfig(), "float8-weight-only": Float8WeightOnlyConfig()}
    for method, config in configs.items():
        layer = torch.nn.Linear(size, size, bias=False, dtype=torch.bfloat16)
        layer.weight.data.copy_(weight)
        quantize_(layer, config)
        errors[method] = error(layer.weight.dequantize())
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    errors["nf4"] = error(bnb.dequantize_4bit(packed, state))
    return errors


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="narrow models and small images (a CPU smoke test)")
    parser.add_argument(
        "--ballast_gib",
        type=float,
        default=None,
        help="GiB standing in for the reward model (default: HPS ViT-H-14 in fp16; 0 with --tiny)",
    )
    parser.add_argument(
        "--cap_gib",
        type=float,
        default=None,
        help="once the trainer is built, refuse GPU memory above this many GiB (as on a smaller card)",
    )
    parser.add_argument("--target_gib", type=float, default=22.0, help="the recipe's peak reserved target")
    parser.add_argument(
        "--rounding_errors",
        action="store_true",
        help="only print each weight format's relative rounding error (CPU, seconds)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.rounding_errors:
        errors = rounding_errors()
        print(json.dumps(errors))
        return errors
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device} but torch sees no CUDA GPU; use --device cpu (with --tiny).")
    if not cuda and not args.tiny:
        raise SystemExit("The FLUX.1-dev-sized recipe needs a GPU; on a CPU pass --tiny.")
    if args.ballast_gib is not None:
        ballast_bytes = int(args.ballast_gib * GIB)
    else:
        ballast_bytes = 0 if args.tiny else 2 * parameter_count(build_on_meta("clip_vit_h_14"))
    pipeline = flux_dev_shaped_pipeline(args.device, torch.bfloat16 if cuda else torch.float32, tiny=args.tiny)
    with tempfile.TemporaryDirectory(prefix="gpu-recipe-24gb-") as scratch:
        result = measure_recipe_24gb(
            pipeline, args.device, ballast_bytes, scratch, args.tiny, args.target_gib, args.cap_gib
        )
    result |= dict(
        device=torch.cuda.get_device_name(args.device) if cuda else "cpu",
        tiny=args.tiny,
        cap_gib=args.cap_gib,
        prompts=len(PROMPTS),
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
