"""``trl-flow-egrpo train``: E-GRPO from a YAML recipe, the paper's recipe by default (FLUX.1-dev, HPS-v2.1 reward).

    trl-flow-egrpo train --config examples/recipes/flux_dev_hps.yaml [--field value ...]
    accelerate launch --config_file examples/accelerate/fsdp_full_shard.yaml -m trl_flow_egrpo.cli train \\
        --config examples/recipes/flux_dev_hps.yaml

Every field of :class:`ScriptArguments` (what is loaded: model, rewards, prompts) and of ``EGRPOConfig`` (how it
is trained) is an option, in the YAML file given to ``--config`` or on the command line (which overrides the
file). ``examples/hpd.py`` is this command as a script.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from ..config import EGRPOConfig
from ..distributed import refuse_single_process_cpu_launch
from . import parse_recipe

logger = logging.getLogger("trl_flow_egrpo.train")

REWARD_NAMES = (
    "hps",
    "clip",
    "pickscore",
    "image_reward",
    "ocr",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "color",
    "brightness",
    "temporal_consistency",
    "edit_consistency",
)
"""The keys of ``trl_flow_egrpo.registry.REWARDS``, for the options' help (the registry imports torch, which
``--help`` does not; tests/test_cli.py checks the two agree)."""


@dataclass
class ScriptArguments:
    """What a training run loads: the model, the rewards, the prompts."""

    model_name_or_path: str = field(
        default="black-forest-labs/FLUX.1-dev",
        metadata={
            "help": "Hub id or local path of a diffusers pipeline; the names of "
            "trl_flow_egrpo.registry.TINY_PIPELINES ('tiny', 'tiny-sd3', 'tiny-flux2', 'tiny-wan', ...) "
            "build an embedded tiny pipeline of that family (random weights, offline)."
        },
    )
    torch_dtype: str = field(default="bfloat16", metadata={"help": "dtype the pipeline is loaded in."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["hps"],
        metadata={
            "help": f"Training rewards, weighted by reward_weights. One of: {', '.join(REWARD_NAMES)}, or "
            "frames_<name> (an image reward averaged over a video's frames)."
        },
    )
    eval_reward_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "Rewards scored at evaluation only (never trained on): watch them for reward hacking."},
    )
    dataset_name: str = field(
        default="ymhao/HPDv2",
        metadata={
            "help": "Training prompts: 'ymhao/HPDv2', a local .txt/.csv/.json/.jsonl/.parquet file, or a Hub dataset."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of dataset_name."})
    eval_dataset_name: str = field(
        default="zhwang/HPDv2",
        metadata={"help": "Evaluation prompts (loaded only when eval_steps > 0); default: the HPSv2 benchmark."},
    )
    eval_dataset_split: str = field(
        default="photo", metadata={"help": "Split of eval_dataset_name (for zhwang/HPDv2: a style, or 'all')."}
    )
    num_eval_prompts: int = field(default=64, metadata={"help": "Evaluate on the first this many prompts (0: all)."})
    hpd_local_dir: str | None = field(
        default=None,
        metadata={
            "help": "A local copy of the HPD v2 files (train.json, test.json, benchmark/*.json) laid out as "
            "on the Hub, used instead of downloading."
        },
    )


def parse_arguments(argv: list[str] | None = None, prog: str | None = None) -> tuple[ScriptArguments, EGRPOConfig]:
    """The run's :class:`ScriptArguments` and ``EGRPOConfig`` from ``--config RECIPE.yaml`` and the options of
    ``argv`` (default: ``sys.argv[1:]``), which override the recipe. ``--help`` lists every option; an unknown
    option or recipe key, or a value the config refuses, exits with the error."""
    return parse_recipe((ScriptArguments, EGRPOConfig), sys.argv[1:] if argv is None else argv, prog, False)


def train(args: ScriptArguments, config: EGRPOConfig):
    """Load the prompts, the rewards and the pipeline, train, save the model; returns the trainer."""
    import datasets
    import torch
    from accelerate import PartialState

    from ..data import load_prompts
    from ..distributed import is_multiprocess_cpu_run, set_cpu_threads
    from ..quantization import nf4_pipeline_quantization_config, precompute_run_prompts
    from ..registry import build_reward, load_pipeline
    from ..trainer import EGRPOTrainer

    main_process = PartialState(cpu=is_multiprocess_cpu_run()).is_main_process
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if main_process else logging.WARNING,
    )
    set_cpu_threads()
    datasets.disable_progress_bars()  # a bar per tiny prompt file would drown the first lines of the log

    train_dataset = load_prompts(
        args.dataset_name, args.dataset_split, config.prompt_column, local_dir=args.hpd_local_dir
    )
    eval_dataset = None
    if config.eval_steps > 0:
        eval_dataset = load_prompts(
            args.eval_dataset_name, args.eval_dataset_split, config.prompt_column, local_dir=args.hpd_local_dir
        )
        if args.num_eval_prompts:
            eval_dataset = eval_dataset.select(range(min(args.num_eval_prompts, len(eval_dataset))))
    logger.info(
        "Prompts: %d for training (%s, %s)%s.",
        len(train_dataset),
        args.dataset_name,
        args.dataset_split,
        f", {len(eval_dataset)} for evaluation ({args.eval_dataset_name}, {args.eval_dataset_split})"
        if eval_dataset is not None
        else "",
    )

    # Rewards first: a misspelled name fails before the pipeline (24 GB for FLUX.1-dev) is loaded.
    rewards = [build_reward(name) for name in args.reward_funcs]
    eval_rewards = [build_reward(name) for name in args.eval_reward_funcs]
    # Under FSDP with fsdp_cpu_ram_efficient_loading only the main process reads the weights; the others get a
    # placeholder that accelerate fills with their shards (no full copy per process).
    # NF4 is a load-time format (bitsandbytes); int8 / float8 are applied by the trainer to the loaded weights.
    quantization_config = nf4_pipeline_quantization_config() if config.quantization == "nf4" else None
    pipeline = load_pipeline(
        args.model_name_or_path,
        getattr(torch, args.torch_dtype),
        main_process_weights_only=True,
        quantization_config=quantization_config,
    )
    logger.info(
        "Model: %s (%s). Rewards: %s (weights %s, aggregation '%s'); eval-only rewards: %s.",
        args.model_name_or_path,
        args.torch_dtype,
        ", ".join(args.reward_funcs),
        config.reward_weights or "all 1",
        config.reward_aggregation,
        ", ".join(args.eval_reward_funcs) or "none",
    )

    trainer = EGRPOTrainer(
        config, pipeline, rewards, train_dataset, eval_dataset=eval_dataset, eval_reward_fns=eval_rewards
    )
    if config.prompt_cache_dir:
        # Encode the whole run's prompts now, while the GPU holds only the (quantized) transformer: training then
        # never brings the text encoders back (what lets the 24 GB recipe fit).
        logger.info("Encoded %d prompts into %s.", precompute_run_prompts(trainer), config.prompt_cache_dir)
    trainer.train()
    if not config.push_to_hub:  # push_to_hub (at the end of train) has already saved the model
        trainer.save_model()
    if trainer.state.eval_history:
        final = trainer.state.eval_history[-1]
        logger.info(
            "Evaluation at iteration %d: %s",
            final["iteration"],
            ", ".join(f"{key} {value:.4f}" for key, value in final.items() if key.endswith("/mean")),
        )
    logger.info(
        "Saved the %s to %s.",
        "LoRA (pipe.load_lora_weights(path))" if config.use_peft else "transformer (subfolder 'transformer')",
        config.output_dir,
    )
    return trainer


def main(argv: list[str] | None = None, prog: str | None = None, launched_as: list[str] | None = None) -> None:
    """Refuse a launch that would silently run one process, parse the options, train.

    Args:
        argv: the options (default: ``sys.argv[1:]``).
        prog: the command's name in ``--help`` and errors (default: the script's).
        launched_as: what torchrun runs before ``argv`` in the working command that a refused launch prints
            (:func:`~trl_flow_egrpo.distributed.refuse_single_process_cpu_launch`); default: the script,
            ``sys.argv[0]``.
    """
    argv = sys.argv[1:] if argv is None else argv
    refuse_single_process_cpu_launch([*(launched_as or [sys.argv[0]]), *argv])
    train(*parse_arguments(argv, prog))
