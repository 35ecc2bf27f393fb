"""``trl-flow-egrpo evaluate``: score a base model and its E-GRPO fine-tune on the HPD v2 test prompts, side by side,
with the paper's numbers next to ours when they are comparable.

    trl-flow-egrpo evaluate --config examples/recipes/flux_dev_hps.yaml --trained_model flux-dev-egrpo-hps

One image per prompt, prompt ``i`` from the noise of seed ``eval_seed + i`` for both models, so the comparison
is paired image by image. ``examples/evaluate.py`` is this command as a script; its docstring describes the two
sampling protocols (``--protocol paper``, the default, and ``--protocol training``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ..config import EGRPOConfig
from . import parse_recipe
from .train import REWARD_NAMES

if TYPE_CHECKING:  # annotations only: torch is imported when the command runs, not for --help
    import torch

logger = logging.getLogger("trl_flow_egrpo.evaluate")

# METHOD.md section 7: FLUX.1-dev on the 400 HPD v2 test prompts. The paper reports PickScore divided by
# 100; it is multiplied back here to match PickScoreReward's scale.
PAPER_COLUMNS = ("paper base", "paper DanceGRPO", "paper E-GRPO (HPS)", "paper E-GRPO (HPS+CLIP)")
PAPER_RESULTS = {
    "hps_v2.1": (0.311, 0.353, 0.391, 0.382),
    "clip_score": (0.388, 0.375, 0.355, 0.401),
    "pickscore": (23.1, 22.8, 23.2, 23.7),
    "image_reward": (1.089, 1.233, 1.324, 1.494),
}


@dataclass(frozen=True)
class Protocol:
    """How the scored images are sampled.

    Attributes:
        name: ``"paper"`` (the plain pipeline call) or ``"training"`` (the training schedule, ODE sampling).
        height: image height in pixels.
        width: image width in pixels.
        num_inference_steps: sampling steps.
        guidance_scale: the family's guidance (FLUX: the guidance embedding; SD3: classifier-free guidance).
        shift: the training schedule's static shift; None: the pipeline's own scheduler (dynamic for FLUX).
        source: where these settings come from, for the printed table.
    """

    name: str
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    shift: float | None
    source: str


# The paper protocol of each model family that has one; other families give their settings on the command line.
PAPER_PROTOCOLS = {
    "flux": Protocol(
        "paper", 1024, 1024, 50, 3.5, None, "the E-GRPO authors' evaluation of FLUX.1-dev: the plain FluxPipeline call"
    ),
    "sd3": Protocol(
        "paper",
        1024,
        1024,
        40,
        4.5,
        None,
        "the paper evaluates FLUX.1-dev only; for SD3 the SD3.5-medium model card's settings, the plain "
        "StableDiffusion3Pipeline call",
    ),
}


@dataclass
class EvalArguments:
    """What is evaluated, on which prompts, with which metrics, under which sampling protocol."""

    model_name_or_path: str = field(
        default="black-forest-labs/FLUX.1-dev",
        metadata={
            "help": "The base pipeline (Hub id or path); the names of trl_flow_egrpo.registry.TINY_PIPELINES "
            "('tiny', 'tiny-sd3', 'tiny-flux2', 'tiny-qwenimage', ...) build an embedded tiny pipeline of that family."
        },
    )
    torch_dtype: str = field(default="bfloat16", metadata={"help": "dtype the pipeline is loaded in."})
    trained_model: str | None = field(
        default=None,
        metadata={"help": "The fine-tune: a LoRA or full fine-tune directory, or a Hub repo. None: base only."},
    )
    metrics: list[str] = field(
        default_factory=lambda: ["hps", "clip", "pickscore", "image_reward"],
        metadata={"help": f"Rewards to score with, from: {', '.join(REWARD_NAMES)}."},
    )
    test_dataset_name: str = field(
        default="ymhao/HPDv2", metadata={"help": "Test prompts: 'ymhao/HPDv2', a local prompt file or a dataset."}
    )
    test_dataset_split: str = field(default="test", metadata={"help": "Split of test_dataset_name."})
    num_test_prompts: int = field(default=400, metadata={"help": "Score the first this many prompts (0: all)."})
    hpd_local_dir: str | None = field(
        default=None, metadata={"help": "A local copy of the HPD v2 files, laid out as on the Hub."}
    )
    results_file: str | None = field(default=None, metadata={"help": "Also write the scores to this JSON file."})
    protocol: str = field(
        default="paper",
        metadata={
            "help": "'paper': the authors' evaluation (plain pipeline call; FLUX: 1024x1024, 50 steps, "
            "guidance 3.5, the pipeline's dynamic shift), the only one comparable to the paper's "
            "numbers. 'training': the training schedule of the config (ODE sampling)."
        },
    )
    eval_height: int | None = field(
        default=None, metadata={"help": "Paper protocol: override the image height (default: the paper's 1024)."}
    )
    eval_width: int | None = field(
        default=None, metadata={"help": "Paper protocol: override the image width (default: the paper's 1024)."}
    )
    eval_num_inference_steps: int | None = field(
        default=None, metadata={"help": "Paper protocol: override the sampling steps (default: the paper's 50)."}
    )
    eval_guidance_scale: float | None = field(
        default=None, metadata={"help": "Paper protocol: override the guidance (default: the paper's 3.5)."}
    )


def resolve_protocol(args: EvalArguments, config: EGRPOConfig, adapter) -> Protocol:
    """The sampling protocol: the paper protocol of ``adapter``'s family with the command line's overrides, or
    the training schedule of ``config`` (with ``adapter``'s guidance when the config leaves it to the family)."""
    overrides = {
        "height": args.eval_height,
        "width": args.eval_width,
        "num_inference_steps": args.eval_num_inference_steps,
        "guidance_scale": args.eval_guidance_scale,
    }
    given = {name: value for name, value in overrides.items() if value is not None}
    if args.protocol == "training":
        if given:
            raise ValueError(
                f"{', '.join('--eval_' + name for name in given)} apply to --protocol paper; the training "
                "protocol samples with the config's height, width, num_inference_steps and "
                "guidance_scale: set those instead."
            )
        return Protocol(
            "training",
            config.height,
            config.width,
            config.num_inference_steps,
            adapter.guidance_scale,
            config.shift,
            "the training schedule, deterministic (ODE) sampling as the trainer's evaluation",
        )
    if args.protocol != "paper":
        raise ValueError(f"--protocol must be 'paper' or 'training', got '{args.protocol}'.")
    if adapter.is_video:
        raise ValueError(
            f"--protocol paper scores images of the plain pipeline call; {adapter.pipeline_class_names[0]} "
            "makes videos: use --protocol training (the trainer's sampler, videos scored by the rewards)."
        )
    paper = PAPER_PROTOCOLS.get(adapter.family)
    if paper is not None:
        return Protocol(**{**asdict(paper), **given})
    missing = [f"--eval_{name}" for name in overrides if name not in given]
    if missing:
        raise ValueError(
            f"--protocol paper has no settings for the '{adapter.family}' family (the paper evaluates "
            f"FLUX.1-dev): give {', '.join(missing)}, or use --protocol training."
        )
    return Protocol(
        "paper",
        shift=None,
        source=f"the plain {adapter.pipeline_class_names[0]} call with these "
        "settings; the paper evaluates FLUX.1-dev only",
        **given,
    )


def comparable_to_paper(protocol: Protocol, family: str) -> bool:
    """Whether scores sampled with ``protocol`` can stand next to the paper's: its exact protocol, on FLUX."""
    return family == "flux" and protocol == PAPER_PROTOCOLS["flux"]


def describe(protocol: Protocol, family: str) -> str:
    """One paragraph for the table: the protocol, its settings and source, and whether the paper's numbers apply."""
    shift = "the pipeline's own scheduler and shift" if protocol.shift is None else f"static shift {protocol.shift:g}"
    settings = (
        f"{protocol.width}x{protocol.height}, {protocol.num_inference_steps} steps, guidance "
        f"{protocol.guidance_scale:g}, {shift}"
    )
    text = f"Protocol '{protocol.name}': {settings} ({protocol.source})."
    if comparable_to_paper(protocol, family):
        return text + " The paper's numbers (FLUX.1-dev, 400 HPD v2 test prompts; PickScore x100) are shown alongside."
    paper = PAPER_PROTOCOLS.get(family)
    if protocol.name == "training":
        reason = "the paper sampled with its own protocol (--protocol paper), not with the training schedule"
    elif paper is not None and protocol != paper:
        reason = (
            f"these settings differ from the protocol's {paper.width}x{paper.height}, "
            f"{paper.num_inference_steps} steps, guidance {paper.guidance_scale:g}"
        )
    else:
        reason = "the paper evaluates FLUX.1-dev only"
    return text + f" The paper's numbers are not shown, they are not comparable: {reason}."


def load_trained(pipeline, trained_model: str, dtype: torch.dtype) -> None:
    """Put the fine-tune into ``pipeline``: a fully fine-tuned transformer, or a LoRA on top of the base."""
    from ..hub import download_checkpoint

    path = trained_model if os.path.isdir(trained_model) else download_checkpoint(trained_model)
    if os.path.isdir(os.path.join(path, "transformer")):
        transformer = type(pipeline.transformer).from_pretrained(path, subfolder="transformer", torch_dtype=dtype)
        pipeline.transformer = transformer.to(pipeline.device)
    else:
        # Into the transformer only, where the trainer's LoRA lives: pipeline.load_lora_weights would also look for
        # text-encoder keys and warn "No LoRA keys associated to CLIPTextModel" on every evaluation.
        pipeline.transformer.load_lora_adapter(path, prefix="transformer", use_safetensors=True)


def sample(
    pipeline, adapter, protocol: Protocol, config: EGRPOConfig, prompts: list[str], seeds: list[int]
) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] of ``prompts`` under ``protocol``, prompt ``i`` from seed ``seeds[i]``.

    The paper protocol is the plain pipeline call, with one seeded CPU generator per prompt (the image does
    not depend on the batch); the training protocol is the trainer's deterministic ODE sampler.
    """
    import torch

    from ..rollout import sample_images

    if protocol.name == "training":
        schedule = adapter.schedule(protocol.num_inference_steps, protocol.shift)
        with torch.no_grad():
            return sample_images(
                adapter,
                adapter.transformer,
                schedule,
                prompts,
                seeds,
                config.rollout_batch_size,
                config.decode_batch_size,
            )
    # The family's own call arguments (Qwen-Image's guidance is true_cfg_scale and needs a negative prompt).
    call = adapter.pipeline_call_arguments(
        {
            "height": protocol.height,
            "width": protocol.width,
            "num_inference_steps": protocol.num_inference_steps,
            "guidance_scale": protocol.guidance_scale,
            "negative_prompt": config.negative_prompt,
        }
    )
    with torch.no_grad():
        return pipeline(
            prompts,
            **call,
            max_sequence_length=config.max_sequence_length,
            output_type="pt",
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        ).images


def score(
    pipeline, protocol: Protocol, config: EGRPOConfig, dataset, metrics: list, names: list[str]
) -> dict[str, torch.Tensor]:
    """Each metric's score of each prompt of ``dataset`` (one image per prompt), as ``{name: float [N]}``."""
    import torch

    from ..adapters import get_adapter
    from ..scoring import call_reward

    adapter = get_adapter(
        pipeline,
        height=protocol.height,
        width=protocol.width,
        guidance_scale=protocol.guidance_scale,
        max_sequence_length=config.max_sequence_length,
        negative_prompt=config.negative_prompt,
        num_frames=config.num_frames,
    )
    # The paper protocol decodes inside each pipeline call: its batch is bounded by the VAE's memory.
    batch_size = (
        config.rollout_batch_size
        if protocol.name == "training"
        else config.decode_batch_size or config.rollout_batch_size
    )
    scores = {name: [] for name in names}
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        prompts = rows.pop(config.prompt_column)
        seeds = [config.eval_seed + start + i for i in range(len(prompts))]
        images = sample(pipeline, adapter, protocol, config, prompts, seeds)
        for name, metric in zip(names, metrics, strict=True):
            scores[name].append(call_reward(name, metric, images, prompts, rows))
        logger.info("%d/%d prompts scored.", min(start + batch_size, len(dataset)), len(dataset))
    return {name: torch.cat(values) for name, values in scores.items()}


def paired_difference(trained: torch.Tensor, base: torch.Tensor) -> tuple[float, float]:
    """Mean of the per-prompt differences ``trained - base`` and its standard error ``std / sqrt(N)``
    (NaN for one prompt): the images are paired (same prompt, same seed), so this is the change's noise."""
    difference = (trained - base).double()
    error = difference.std().item() / len(difference) ** 0.5 if len(difference) > 1 else float("nan")
    return difference.mean().item(), error


def format_table(results: dict[str, dict[str, torch.Tensor]], names: list[str], with_paper: bool) -> str:
    """A Markdown table: one row per metric, the mean score of each model, the paired change (with its standard
    error) when there are two models, and the paper's reference numbers when ``with_paper``."""
    models = list(results)
    paired = len(models) == 2
    header = [
        "metric",
        *models,
        *(["trained - base (± s.e.)"] if paired else []),
        *(PAPER_COLUMNS if with_paper else []),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [name, *(f"{results[model][name].mean().item():.4f}" for model in models)]
        if paired:
            change, error = paired_difference(results[models[1]][name], results[models[0]][name])
            # Three significant digits: a small change after a short run must not print as +0.0000.
            cells.append(f"{change:+.3g} ± {error:.2g}")
        if with_paper:
            cells += [f"{value:g}" for value in PAPER_RESULTS[name]] if name in PAPER_RESULTS else ["-"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate(args: EvalArguments, config: EGRPOConfig) -> None:
    """Score the base model (and the fine-tune, when ``args.trained_model`` is given); print the table and write
    ``args.results_file``."""
    import datasets
    import torch
    from accelerate import PartialState

    from ..adapters import get_adapter
    from ..data import load_prompts
    from ..distributed import is_multiprocess_cpu_run, set_cpu_threads
    from ..registry import build_reward, load_pipeline
    from ..scoring import unique_reward_names

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    set_cpu_threads()
    datasets.disable_progress_bars()
    dataset = load_prompts(
        args.test_dataset_name, args.test_dataset_split, config.prompt_column, local_dir=args.hpd_local_dir
    )
    if args.num_test_prompts:
        dataset = dataset.select(range(min(args.num_test_prompts, len(dataset))))
    metrics = [build_reward(name) for name in args.metrics]
    names = unique_reward_names(metrics)
    dtype = getattr(torch, args.torch_dtype)
    pipeline = load_pipeline(args.model_name_or_path, dtype).to(PartialState(cpu=is_multiprocess_cpu_run()).device)
    pipeline.set_progress_bar_config(disable=True)
    adapter = get_adapter(
        pipeline,
        height=config.height,
        width=config.width,
        guidance_scale=config.guidance_scale,
        num_frames=config.num_frames,
    )
    if adapter.edits_images:
        raise SystemExit(
            f"trl-flow-egrpo evaluate scores text-to-image models on prompts alone; {type(pipeline).__name__} edits "
            "a source image per prompt. Evaluate an editing model with EGRPOTrainer.evaluate() on an eval_dataset "
            "that has a source-image column (the train command does so with eval_dataset_name; docs/editing.md)."
        )
    family = adapter.family
    protocol = resolve_protocol(args, config, adapter)
    logger.info(
        "Scoring %d prompts (%s, %s) with %s. %s",
        len(dataset),
        args.test_dataset_name,
        args.test_dataset_split,
        ", ".join(names),
        describe(protocol, family),
    )

    results = {"base": score(pipeline, protocol, config, dataset, metrics, names)}
    if args.trained_model:
        load_trained(pipeline, args.trained_model, dtype)
        results["trained"] = score(pipeline, protocol, config, dataset, metrics, names)

    with_paper = comparable_to_paper(protocol, family)
    print(
        f"\n{len(dataset)} prompts, one image each (seeds {config.eval_seed}..{config.eval_seed + len(dataset) - 1})."
        f"\n{describe(protocol, family)}\n\n{format_table(results, names, with_paper)}"
    )
    if args.trained_model and all(torch.equal(results["trained"][name], results["base"][name]) for name in names):
        print(
            "\nThe trained model scored exactly as the base on every image: the fine-tune did not change the "
            "model (a LoRA that never trained, or the wrong --trained_model)."
        )
    if args.results_file:
        with open(args.results_file, "w") as handle:
            json.dump(
                {
                    "num_prompts": len(dataset),
                    "protocol": asdict(protocol),
                    "comparable_to_paper": with_paper,
                    "models": {"base": args.model_name_or_path, "trained": args.trained_model},
                    "scores": {
                        model: {name: values.mean().item() for name, values in scores.items()}
                        for model, scores in results.items()
                    },
                    "trained_minus_base": {
                        name: dict(
                            zip(
                                ("mean", "standard_error"),
                                paired_difference(results["trained"][name], results["base"][name]),
                                strict=True,
                            )
                        )
                        for name in names
                    }
                    if args.trained_model
                    else {},
                },
                handle,
                indent=1,
            )


def parse_arguments(argv: list[str] | None = None, prog: str | None = None) -> tuple[EvalArguments, EGRPOConfig]:
    """The evaluation's :class:`EvalArguments` and ``EGRPOConfig`` from ``--config RECIPE.yaml`` and ``argv``
    (default: ``sys.argv[1:]``). A training recipe's keys for ``trl-flow-egrpo train`` only (rewards, training
    prompts) are ignored; an unknown command-line option is an error."""
    return parse_recipe((EvalArguments, EGRPOConfig), sys.argv[1:] if argv is None else argv, prog, True)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Parse the options of ``argv`` (default: ``sys.argv[1:]``) and evaluate."""
    evaluate(*parse_arguments(argv, prog))
