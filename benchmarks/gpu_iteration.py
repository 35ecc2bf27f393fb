"""One E-GRPO iteration of a FLUX.1-dev-shaped transformer (random weights, bf16, LoRA): time and peak memory.

    python benchmarks/gpu_iteration.py                      # on a GPU: the paper's setting, 720x720, G=12
    python benchmarks/gpu_iteration.py --layers 1 --single_layers 1 --size 64 --generations 2 --steps 4 \
        --max_sequence_length 16 --device cpu            # a smoke test of the script on a CPU

The transformer has FLUX.1-dev's exact configuration (19 double + 38 single blocks, 3072 wide, 12B
parameters; fewer blocks with --layers / --single_layers) and random weights, so no download is needed.
The text encoders are one-layer stand-ins of the right widths (CLIP pooled 768, T5 4096) and the VAE is
the tiny 8x one of ``trl_flow_egrpo.tiny``: what is measured is the transformer's cost, which is what
E-GRPO spends (sampling: 16 + G * 83 rows per prompt at the paper's plan; update: one forward and
backward per (prompt, merged step) group). The reward is the weight-free colour reward.

Prints the seconds of each iteration (the first includes warm-up), its split into sampling / rewards /
update, the transformer evaluations, the on-policy max |r - 1| and the peak GPU memory.
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer  # noqa: E402
from trl_flow_egrpo.rewards import ColorReward  # noqa: E402
from trl_flow_egrpo.tiny import build_tiny_flux_pipeline  # noqa: E402

FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def flux_shaped_pipeline(layers: int, single_layers: int, device: str, dtype: torch.dtype):
    """The tiny pipeline with a FLUX.1-dev-shaped transformer and width-matched one-layer text encoders."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tiny = build_tiny_flux_pipeline()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype directly: 12B float32 weights would not fit
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**(FLUX_DEV_TRANSFORMER | dict(num_layers=layers,
                                                                                num_single_layers=single_layers)))
            text_encoder = CLIPTextModel(CLIPTextConfig(
                hidden_size=768, intermediate_size=256, num_attention_heads=12, num_hidden_layers=1, vocab_size=1000,
                bos_token_id=0, eos_token_id=2, pad_token_id=1, max_position_embeddings=77, projection_dim=768))
            text_encoder_2 = T5EncoderModel(T5Config(
                vocab_size=256, d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=8, dropout_rate=0.0,
                relative_attention_num_buckets=8, is_encoder_decoder=False, use_cache=False, pad_token_id=0,
                eos_token_id=1, decoder_start_token_id=0))
    finally:
        torch.set_default_dtype(default_dtype)
    pipeline = FluxPipeline(scheduler=tiny.scheduler, vae=tiny.vae, text_encoder=text_encoder, tokenizer=tiny.tokenizer,
                            text_encoder_2=text_encoder_2, tokenizer_2=tiny.tokenizer_2, transformer=transformer)
    for module in (transformer, text_encoder, text_encoder_2, tiny.vae):
        module.eval()
    return pipeline.to(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=19)
    parser.add_argument("--single_layers", type=int, default=38)
    parser.add_argument("--size", type=int, default=720, help="image height and width (authors' code: 720)")
    parser.add_argument("--generations", type=int, default=12, help="G (paper code: 12)")
    parser.add_argument("--steps", type=int, default=16, help="T (paper: 16; 8 active steps)")
    parser.add_argument("--rollout_batch_size", type=int, default=16)
    parser.add_argument("--max_sequence_length", type=int, default=512, help="T5 tokens (FLUX.1-dev: 512)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    bf16 = args.device != "cpu"

    start = time.perf_counter()
    pipeline = flux_shaped_pipeline(args.layers, args.single_layers, args.device,
                                    torch.bfloat16 if bf16 else torch.float32)
    parameters = sum(p.numel() for p in pipeline.transformer.parameters())
    print(f"FLUX-shaped transformer: {parameters / 1e9:.2f}B parameters, built in {time.perf_counter() - start:.1f} s "
          f"on {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))

    with tempfile.TemporaryDirectory() as output_dir:
        config = EGRPOConfig(output_dir=output_dir, height=args.size, width=args.size, num_generations=args.generations,
                             max_steps=args.iterations, mixed_precision="bf16" if bf16 else "no",
                             rollout_batch_size=args.rollout_batch_size, save_steps=0, disable_tqdm=True,
                             max_sequence_length=args.max_sequence_length, num_inference_steps=args.steps,
                             num_active_steps=min(8, args.steps),
                             gradient_checkpointing=args.gradient_checkpointing)
        trainer = EGRPOTrainer(config, pipeline, [ColorReward()], Dataset.from_dict({"prompt": ["a red apple"] * 8}))
        for iteration in range(args.iterations):
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            metrics = trainer.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" \
                if args.device.startswith("cuda") else ""
            print(f"iteration {iteration + 1}: {seconds:.1f} s (sampling {metrics['time/sampling']:.1f} s, rewards "
                  f"{metrics['time/rewards']:.2f} s, update {metrics['time/update']:.1f} s), "
                  f"{metrics['transformer_evaluations']} transformer evaluations, on-policy max|r-1| "
                  f"{metrics['ratio/on_policy_max_abs_dev']:.1e}{peak}", flush=True)


if __name__ == "__main__":
    main()
