"""A small pretrained FLUX pipeline whose prompts mean something, with verifiable pixel rewards.

A random-weight tiny FLUX has no relation between prompt and image, so its learning curves say little about
credit assignment. The testbed is a ``diffusers.FluxPipeline`` of FLUX.1's layout, scaled down and trained by
flow matching (CPU, single thread, fixed steps from one seed) on synthetic scenes of one or two coloured shapes
at named positions ("a red circle top left and a blue square bottom right"), with rewards that check the
pixels (:mod:`.rewards`: the right colour at the right place, how pure it is, the right number of objects).

Use::

    from benchmarks.testbed import egrpo_config, heldout_prompts, load_testbed_pipeline, train_prompts
    from benchmarks.testbed.rewards import ColourPurityReward, CompositionReward, CountReward

    pipeline = load_testbed_pipeline()
    trainer = EGRPOTrainer(egrpo_config("out", max_steps=10), pipeline, [ColourPurityReward()],
                           train_prompts(), eval_dataset=heldout_prompts()[:64],
                           eval_reward_fns=[CompositionReward(), CountReward()])

Sample with the resolution and the T5 length the model was trained for (:data:`SAMPLING`; a plain pipeline
call needs ``max_sequence_length=16`` too, since T5 embeddings depend on the padded length). docs/testbed.md
has the recipe, the numbers and how to rebuild the checkpoint.
"""

from __future__ import annotations

import logging
import os

from .grammar import split_prompts

CHECKPOINT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint")
"""The committed pipeline (``FluxPipeline.save_pretrained`` layout)."""

SAMPLING: dict[str, int] = {"height": 32, "width": 32, "max_sequence_length": 16}
"""Image size and T5 token length the testbed was trained for; pass them to the pipeline and the trainer."""

logger = logging.getLogger(__name__)


def train_prompts() -> list[str]:
    """The 2652 training prompts (every one-object prompt, and the two-object prompts of the training pairs)."""
    return split_prompts()[0]


def heldout_prompts() -> list[str]:
    """The 288 held-out prompts: two-object compositions that appear in no training prompt, in either order."""
    return split_prompts()[1]


def load_testbed_pipeline(directory: str = CHECKPOINT_DIR, build_if_missing: bool = True):
    """The pretrained testbed ``FluxPipeline`` (CPU, float32, eval mode).

    Args:
        directory: a saved testbed pipeline; the default is the committed checkpoint.
        build_if_missing: when ``directory`` holds no pipeline, build it from the default recipe's seed (minutes
            of CPU time, see docs/testbed.md) and save it there first. False raises instead.

    Raises:
        FileNotFoundError: no pipeline in ``directory`` and ``build_if_missing`` is False.
    """
    from diffusers import FluxPipeline

    if not os.path.exists(os.path.join(directory, "model_index.json")):
        if not build_if_missing:
            raise FileNotFoundError(
                f"No testbed pipeline in {directory}: build it with "
                f"`python benchmarks/testbed/build.py --out {directory}`, or pass "
                "build_if_missing=True."
            )
        from .build import build_testbed, save_testbed
        from .train import Recipe

        logger.warning("No testbed pipeline in %s: building it from the seed (several minutes of CPU).", directory)
        pipeline, log = build_testbed(Recipe())
        save_testbed(pipeline, log, Recipe(), directory)
    pipeline = FluxPipeline.from_pretrained(directory)
    _load_flat_clip_weights(pipeline.text_encoder, directory)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _load_flat_clip_weights(text_encoder, directory: str) -> None:
    """Load the committed CLIP text encoder's weights where the installed transformers expects other names.

    Recent transformers 5.x save ``CLIPTextModel`` weights flat (``embeddings.*``, ``encoder.*``); transformers 5.0
    nests them under ``text_model.``, so it reports every committed weight MISSING and leaves the encoder random.
    There the flat weights are loaded under the nested names (strictly: every weight must match)."""
    expected = list(text_encoder.state_dict())
    if not expected or not all(name.startswith("text_model.") for name in expected):
        return
    from safetensors.torch import load_file

    saved = load_file(os.path.join(directory, "text_encoder", "model.safetensors"))
    if any(name.startswith("text_model.") for name in saved):
        return
    text_encoder.load_state_dict({f"text_model.{name}": tensor for name, tensor in saved.items()}, strict=True)


def egrpo_config(output_dir: str, **overrides):
    """An ``EGRPOConfig`` for the testbed: its resolution and T5 length (:data:`SAMPLING`), float32, no
    checkpoints, no progress bar, batches sized for the tiny model, and the recipe under which RL raises the
    held-out :class:`~.rewards.ColourPurityReward` (docs/testbed.md): ``G = 8``, 4 prompts per iteration, a LoRA
    learning rate of 1e-3 with one optimizer step per iteration (``optimizer_step="iteration"``; with eight
    4-prompt Adam steps per iteration the policy drifted instead of learning) and ``advantage_eps=0.05``, so that reward
    differences far below the reward's scale within a group are not blown up into full-size advantages.
    ``overrides`` replace any field."""
    from trl_flow_egrpo import EGRPOConfig

    values = dict(
        output_dir=output_dir,
        **SAMPLING,
        mixed_precision="no",
        num_generations=8,
        prompts_per_device=4,
        rollout_batch_size=128,
        decode_batch_size=128,
        per_device_train_batch_size=64,
        learning_rate=1e-3,
        optimizer_step="iteration",
        advantage_eps=0.05,
        clip_range=1e-2,
        lora_r=8,
        lora_alpha=8,
        save_steps=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return EGRPOConfig(**values)
