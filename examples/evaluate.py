"""Score a base model and its E-GRPO fine-tune on the HPD v2 test prompts: the paper's table, side by side.

One image per prompt, deterministic (ODE) sampling with the training schedule, prompt ``i`` from the noise
of seed ``eval_seed + i`` for both models (so the comparison is paired, and matches the trainer's own
evaluation). Metrics default to the paper's: HPS-v2.1, CLIP score, PickScore, ImageReward.

    python examples/evaluate.py --config examples/recipes/flux_dev_hps.yaml --trained_model flux-dev-egrpo-hps

The sampling settings (resolution, steps, shift, guidance, batch sizes) are EGRPOConfig fields, so the
training recipe gives them; its training-only keys are ignored. ``--trained_model`` is a LoRA directory
(``pytorch_lora_weights.safetensors``), a full fine-tune's output directory (``transformer/``), or a Hub
repository with either. Offline on a CPU, with the tiny pipeline and weight-free metrics:

    python examples/evaluate.py --model_name_or_path tiny --torch_dtype float32 --trained_model tiny-run \\
        --test_dataset_name prompts.txt --metrics color brightness --height 64 --width 64 \\
        --max_sequence_length 32 --mixed_precision no
"""

import json
import logging
import os
from dataclasses import dataclass, field

import datasets
import torch
from accelerate import PartialState
from trl import TrlParser

from trl_flow_egrpo import EGRPOConfig
from trl_flow_egrpo.adapters import get_adapter
from trl_flow_egrpo.data import load_prompts
from trl_flow_egrpo.hub import download_checkpoint
from trl_flow_egrpo.registry import REWARDS, build_reward, load_pipeline
from trl_flow_egrpo.distributed import is_multiprocess_cpu_run
from trl_flow_egrpo.rollout import decode_in_chunks, sample_ode
from trl_flow_egrpo.scoring import call_reward, unique_reward_names

logger = logging.getLogger("evaluate")

# METHOD.md section 7: FLUX.1-dev on the 400 HPD v2 test prompts. The paper reports PickScore divided by
# 100; it is multiplied back here to match PickScoreReward's scale.
PAPER_COLUMNS = ("paper base", "paper DanceGRPO", "paper E-GRPO (HPS)", "paper E-GRPO (HPS+CLIP)")
PAPER_RESULTS = {
    "hps_v2.1": (0.311, 0.353, 0.391, 0.382),
    "clip_score": (0.388, 0.375, 0.355, 0.401),
    "pickscore": (23.1, 22.8, 23.2, 23.7),
    "image_reward": (1.089, 1.233, 1.324, 1.494),
}


@dataclass
class EvalArguments:
    """What is evaluated, on which prompts, with which metrics."""

    model_name_or_path: str = field(
        default="black-forest-labs/FLUX.1-dev",
        metadata={"help": "The base pipeline (Hub id or path); 'tiny' / 'tiny-sd3' build the embedded tiny FLUX / "
                          "SD3 pipeline."})
    torch_dtype: str = field(default="bfloat16", metadata={"help": "dtype the pipeline is loaded in."})
    trained_model: str | None = field(
        default=None,
        metadata={"help": "The fine-tune: a LoRA or full fine-tune directory, or a Hub repo. None: base only."})
    metrics: list[str] = field(
        default_factory=lambda: ["hps", "clip", "pickscore", "image_reward"],
        metadata={"help": f"Rewards to score with, from: {', '.join(REWARDS)}."})
    test_dataset_name: str = field(
        default="ymhao/HPDv2", metadata={"help": "Test prompts: 'ymhao/HPDv2', a local prompt file or a dataset."})
    test_dataset_split: str = field(default="test", metadata={"help": "Split of test_dataset_name."})
    num_test_prompts: int = field(default=400, metadata={"help": "Score the first this many prompts (0: all)."})
    hpd_local_dir: str | None = field(
        default=None, metadata={"help": "A local copy of the HPD v2 files, laid out as on the Hub."})
    results_file: str | None = field(default=None, metadata={"help": "Also write the scores to this JSON file."})


def load_trained(pipeline, trained_model: str, dtype: torch.dtype) -> None:
    """Put the fine-tune into ``pipeline``: a fully fine-tuned transformer, or a LoRA on top of the base."""
    path = trained_model if os.path.isdir(trained_model) else download_checkpoint(trained_model)
    if os.path.isdir(os.path.join(path, "transformer")):
        transformer = type(pipeline.transformer).from_pretrained(path, subfolder="transformer", torch_dtype=dtype)
        pipeline.transformer = transformer.to(pipeline.device)
    else:
        pipeline.load_lora_weights(path)


@torch.no_grad()
def score(pipeline, config: EGRPOConfig, dataset, metrics: list, names: list[str]) -> dict[str, float]:
    """Mean score of each metric over one deterministic image per prompt of ``dataset``."""
    adapter = get_adapter(pipeline, height=config.height, width=config.width, guidance_scale=config.guidance_scale,
                          max_sequence_length=config.max_sequence_length, negative_prompt=config.negative_prompt)
    schedule = adapter.schedule(config.num_inference_steps, config.shift)
    batch_size = config.rollout_batch_size
    totals = dict.fromkeys(names, 0.0)
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start:start + batch_size]
        prompts = rows.pop(config.prompt_column)
        # Noise per prompt from its own seed: the same image whatever the batch size.
        noise = torch.cat([adapter.initial_noise(1, torch.Generator("cpu").manual_seed(config.eval_seed + start + i))
                           for i in range(len(prompts))])
        latents = sample_ode(adapter, adapter.transformer, schedule, adapter.encode_prompts(prompts), noise,
                             batch_size)
        images = decode_in_chunks(adapter, latents, config.decode_batch_size or batch_size)
        for name, metric in zip(names, metrics):
            totals[name] += call_reward(name, metric, images, prompts, rows).sum().item()
        logger.info("%d/%d prompts scored.", min(start + batch_size, len(dataset)), len(dataset))
    return {name: total / len(dataset) for name, total in totals.items()}


def format_table(results: dict[str, dict[str, float]], names: list[str]) -> str:
    """A Markdown table: one row per metric, our models' scores, then the paper's reference numbers."""
    header = ["metric", *results, *(["trained - base"] if len(results) == 2 else []), *PAPER_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        ours = [results[model][name] for model in results]
        delta = [f"{ours[1] - ours[0]:+.4f}"] if len(ours) == 2 else []
        paper = [f"{value:g}" for value in PAPER_RESULTS[name]] if name in PAPER_RESULTS else ["-"] * 4
        lines.append("| " + " | ".join([name, *(f"{value:.4f}" for value in ours), *delta, *paper]) + " |")
    return "\n".join(lines)


def main(args: EvalArguments, config: EGRPOConfig):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    datasets.disable_progress_bars()
    dataset = load_prompts(args.test_dataset_name, args.test_dataset_split, config.prompt_column,
                           local_dir=args.hpd_local_dir)
    if args.num_test_prompts:
        dataset = dataset.select(range(min(args.num_test_prompts, len(dataset))))
    metrics = [build_reward(name) for name in args.metrics]
    names = unique_reward_names(metrics)
    dtype = getattr(torch, args.torch_dtype)
    pipeline = load_pipeline(args.model_name_or_path, dtype).to(PartialState(cpu=is_multiprocess_cpu_run()).device)
    logger.info("Scoring %d prompts (%s, %s) with %s; %d steps, shift %s, %dx%d.", len(dataset),
                args.test_dataset_name, args.test_dataset_split, ", ".join(names), config.num_inference_steps,
                config.shift, config.height, config.width)

    results = {"base": score(pipeline, config, dataset, metrics, names)}
    if args.trained_model:
        load_trained(pipeline, args.trained_model, dtype)
        results["trained"] = score(pipeline, config, dataset, metrics, names)

    print(f"\n{len(dataset)} prompts, one image each (seeds {config.eval_seed}..{config.eval_seed + len(dataset) - 1})"
          f"\n\n{format_table(results, names)}\n\nPaper: FLUX.1-dev, 400 HPD v2 test prompts; its PickScore is shown "
          "x100, on PickScoreReward's scale.")
    if args.results_file:
        with open(args.results_file, "w") as handle:
            json.dump({"num_prompts": len(dataset), "models": {"base": args.model_name_or_path,
                                                               "trained": args.trained_model},
                       "scores": results}, handle, indent=1)


if __name__ == "__main__":
    # The training recipes hold script keys of examples/hpd.py (rewards, training prompts): ignore those,
    # but not unknown command-line options.
    *parsed, _, unknown = TrlParser((EvalArguments, EGRPOConfig)).parse_args_and_config(
        return_remaining_strings=True, separate_remaining_strings=True)
    if unknown:
        raise SystemExit(f"Unknown options: {unknown}")
    main(*parsed)
