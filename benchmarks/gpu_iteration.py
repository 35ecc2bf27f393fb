"""E-GRPO iterations of the LoRA recipe on FLUX.1-dev-shaped models with random weights: time and peak memory.

    python benchmarks/gpu_iteration.py                   # on a GPU: the recipe as it is (720x720, G=12, bf16)
    python benchmarks/gpu_iteration.py --tiny --device cpu   # a smoke test of the script on a CPU
    python benchmarks/gpu_iteration.py --compile_transformer --attention_backend _native_cudnn  # speed switches

The pipeline has FLUX.1-dev's exact architecture, component by component (the configurations of
``benchmarks/memory.py``): the 12B transformer, T5-XXL and CLIP-L text encoders, the 16-channel VAE, with
random weights built directly on the device in bf16, so nothing is downloaded and no float32 copy ever
exists in host memory. The tokenizers are the in-memory ones of ``trl_flow_egrpo.tiny`` (their ids fit
every vocabulary). The settings are those of ``examples/recipes/flux_dev_lora_single_gpu.yaml``; the reward
is the weight-free colour reward (``gpu_probe.py`` adds ballast for the real reward model's weights).

``--tiny`` narrows the transformer (one block of each kind, two heads) and uses one-layer text encoders of
the right widths and the tiny VAE: the same code path at a size a CPU runs in seconds.

Prints, per iteration, the seconds (the first includes warm-up, and compilation with
``--compile_transformer``) and their split into sampling / rewards / update, the transformer evaluations,
rows per second of sampling and update, the sampling MFU (on GPUs of known peak), the on-policy max |r - 1|
and the peak GPU memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import CLIP_L_TEXT, FLUX_DEV_TRANSFORMER, FLUX_DEV_VAE, REPO, T5_XXL_ENCODER  # noqa: E402
from trl_flow_egrpo.acceleration import PhasePeakMemory  # noqa: E402

LORA_RECIPE = os.path.join(REPO, "examples", "recipes", "flux_dev_lora_single_gpu.yaml")
TINY_TRANSFORMER = dict(num_layers=1, num_single_layers=1, num_attention_heads=2)
"""--tiny: one double and one single block, 2 heads of 128 (256 wide); inputs keep FLUX.1-dev's widths."""
TINY_RECIPE = dict(
    height=64,
    width=64,
    num_generations=2,
    num_inference_steps=4,
    num_active_steps=2,
    max_sequence_length=16,
    rollout_batch_size=4,
    decode_batch_size=2,
)
"""--tiny: the recipe's settings at a size a CPU runs in seconds."""
PROMPTS = ["a red apple on a wooden table", "a fire truck in the rain", "a lighthouse at dusk", "a bowl of ramen"]


def flux_dev_shaped_pipeline(device: str | torch.device, dtype: torch.dtype, tiny: bool = False, seed: int = 0):
    """A ``FluxPipeline`` with FLUX.1-dev's component shapes and random weights, built on ``device`` in ``dtype``.

    Args:
        device: where the weights are created (directly: a 12B model never exists in host memory).
        dtype: dtype of every component.
        tiny: narrow transformer (:data:`TINY_TRANSFORMER`), one-layer text encoders of the right widths,
            and the tiny VAE of :func:`trl_flow_egrpo.tiny.build_tiny_flux_pipeline`.
        seed: seeds the random weights.
    """
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from trl_flow_egrpo.tiny import build_tiny_flux_pipeline

    small = build_tiny_flux_pipeline(seed=seed)
    tokenizer, tokenizer_2 = small.tokenizer, small.tokenizer_2
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if tiny:
        clip = CLIP_L_TEXT | dict(intermediate_size=256, num_hidden_layers=1, vocab_size=1000) | ids
        t5 = T5_XXL_ENCODER | dict(vocab_size=256, d_ff=256, num_layers=1, num_heads=8, dropout_rate=0.0)
    else:
        clip = CLIP_L_TEXT | ids
        t5 = T5_XXL_ENCODER | dict(dropout_rate=0.0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # create the weights in their final dtype
    try:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            transformer = FluxTransformer2DModel(**(FLUX_DEV_TRANSFORMER | (TINY_TRANSFORMER if tiny else {})))
            text_encoder = CLIPTextModel(CLIPTextConfig(**clip))
            text_encoder_2 = T5EncoderModel(T5Config(**t5))
            vae = small.vae.to(device, dtype) if tiny else AutoencoderKL(**FLUX_DEV_VAE)
    finally:
        torch.set_default_dtype(default_dtype)
    pipeline = FluxPipeline(
        scheduler=small.scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    for module in (text_encoder, text_encoder_2):
        module.tie_weights()  # as from_pretrained does (transformers 5.0 builds T5's embeddings untied)
    for module in (transformer, text_encoder, text_encoder_2, vae):
        module.eval()
    return pipeline


def lora_recipe_config(output_dir: str, device: str, tiny: bool = False, **overrides):
    """The ``EGRPOConfig`` of ``examples/recipes/flux_dev_lora_single_gpu.yaml`` for a benchmark run.

    No checkpoints, evaluation, trackers or Hub; no mixed precision on a CPU (float32 there: CPUs have no
    fast bf16); ``tiny`` applies :data:`TINY_RECIPE`; ``overrides`` last.
    """
    from trl_flow_egrpo import EGRPOConfig

    with open(LORA_RECIPE) as f:
        recipe = yaml.safe_load(f)
    fields = {field.name for field in dataclasses.fields(EGRPOConfig)}
    values = {key: value for key, value in recipe.items() if key in fields}
    values |= dict(
        output_dir=output_dir, save_steps=0, eval_steps=0, log_with=None, push_to_hub=False, disable_tqdm=True
    )
    if str(device) == "cpu":
        values["mixed_precision"] = "no"
    return EGRPOConfig(**(values | (TINY_RECIPE if tiny else {}) | overrides))


def build_trainer(pipeline, config):
    """An ``EGRPOTrainer`` on ``pipeline`` with the colour reward and a few prompts."""
    from trl_flow_egrpo import EGRPOTrainer
    from trl_flow_egrpo.rewards import ColorReward

    return EGRPOTrainer(config, pipeline, [ColorReward()], [{"prompt": prompt} for prompt in PROMPTS])


def timed_step(trainer, device: str) -> dict:
    """One ``trainer.step()``: its metrics plus ``seconds`` and, on CUDA, peak allocated / reserved GiB.

    The peaks are reset first (after emptying the allocator's cache), so they are this iteration's own. The
    trainer resets them again at each phase and logs each phase's peaks, so the iteration's are the largest of
    those and of what was reached after the last phase.
    """
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    metrics = trainer.step()
    if cuda:
        torch.cuda.synchronize()
    result = dict(metrics, seconds=time.perf_counter() - start)
    if cuda:
        for kind, since_last_phase in (
            ("allocated", torch.cuda.max_memory_allocated()),
            ("reserved", torch.cuda.max_memory_reserved()),
        ):
            phases = PhasePeakMemory.overall(metrics, kind)
            result[f"peak_{kind}_gib"] = max(since_last_phase / 2**30, phases or 0.0)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="narrow models and small images (a CPU smoke test)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--gradient_checkpointing", choices=["recipe", "on", "off"], default="recipe")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile_transformer", action="store_true", help="the config's compile_transformer")
    parser.add_argument("--attention_backend", default=None, help="the config's attention_backend")
    args = parser.parse_args()
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16

    start = time.perf_counter()
    pipeline = flux_dev_shaped_pipeline(args.device, dtype, tiny=args.tiny)
    parameters = sum(p.numel() for p in pipeline.transformer.parameters())
    print(
        f"FLUX.1-dev-shaped pipeline: transformer {parameters / 1e9:.2f}B parameters, built in "
        f"{time.perf_counter() - start:.1f} s on {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
    )
    overrides = (
        {}
        if args.gradient_checkpointing == "recipe"
        else dict(gradient_checkpointing=args.gradient_checkpointing == "on")
    )
    overrides.update(compile_transformer=args.compile_transformer, attention_backend=args.attention_backend)
    with tempfile.TemporaryDirectory() as output_dir:
        config = lora_recipe_config(output_dir, args.device, args.tiny, max_steps=args.iterations, **overrides)
        trainer = build_trainer(pipeline, config)
        for iteration in range(args.iterations):
            result = timed_step(trainer, args.device)
            peak = (
                f", peak GPU memory {result['peak_allocated_gib']:.1f} GiB allocated / "
                f"{result['peak_reserved_gib']:.1f} GiB reserved"
                if "peak_reserved_gib" in result
                else ""
            )
            print(
                f"iteration {iteration + 1}: {result['seconds']:.1f} s (sampling {result['time/sampling']:.1f} s, "
                f"rewards {result['time/rewards']:.2f} s, update {result['time/update']:.1f} s), "
                f"{result['transformer_rows']} transformer rows, "
                f"{result['time/sampling_rows_per_s']:.2f} rows/s sampling, "
                f"{result['time/update_rows_per_s']:.2f} rows/s update"
                + (
                    f" (log-prob recompute {result['time/recompute_log_probs']:.1f} s)"
                    if "time/recompute_log_probs" in result
                    else ""
                )
                + ", sampling MFU "
                f"{result.get('time/sampling_mfu', float('nan')):.3f}, on-policy max|r-1| "
                f"{result['ratio/on_policy_max_abs_dev']:.1e}{peak}",
                flush=True,
            )


if __name__ == "__main__":
    main()
