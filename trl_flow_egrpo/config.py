"""``EGRPOConfig``: every knob of an E-GRPO run, documented field by field.

Defaults are the paper's recipe for FLUX.1-dev (METHOD.md section 7), except that LoRA is the default
(with a learning rate suited to LoRA) and full fine-tuning is one flag (``use_peft=False``).
Works with ``transformers.HfArgumentParser`` and ``trl.TrlParser`` (YAML config + CLI overrides).
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields

from .redaction import redact


def _doc(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


QUANTIZATION_METHODS = (None, "int8-weight-only", "float8-weight-only", "nf4")
"""Values of ``EGRPOConfig.quantization`` (None: no quantization)."""
OPTIMIZERS = ("adamw", "adamw_8bit")
"""Values of ``EGRPOConfig.optimizer``."""
REWARD_WEIGHT_SUM_LIMIT = 1e6
"""Largest allowed ``sum(|reward_weights|)``. Rewards are weighted and summed in float32 (largest value 3.4e38):
below this limit the weighted sum stays finite for any reward up to 1e32 in magnitude, while weights like
``[1e308, 1e308]`` overflow to inf and the advantages to NaN."""

YAML_BOOLEAN_WORDS = {True: "yes, on and true", False: "no, off and false"}
"""The unquoted words YAML 1.1 (PyYAML, hence TrlParser) reads as booleans instead of strings."""

_BOOLEAN_MEANINGS = {"resume_from_checkpoint": {True: "true", False: None}}
"""Fields whose documented values a YAML boolean stands for: ``resume_from_checkpoint: true`` is the documented
'latest checkpoint', and ``false`` means not resuming."""


@functools.cache
def _field_annotations(cls: type) -> dict[str, object]:
    """The resolved annotation of every dataclass field of ``cls`` (this module postpones annotations, so
    ``Field.type`` holds strings)."""
    hints = typing.get_type_hints(cls)
    return {item.name: hints[item.name] for item in fields(cls)}


def _union_members(annotation) -> tuple:
    """The alternatives of ``X | Y`` / ``Optional[X]``, or ``(annotation,)``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _describe_type(annotation) -> str:
    """``annotation`` in words for an error message: ``int``, ``float or None``, ``list of str or None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(member) for member in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (object,)
        return f"list of {_describe_type(item)}"
    return getattr(annotation, "__name__", str(annotation))


_NO_MATCH = object()


def _as_scalar(value, kind, lenient: bool):
    """``value`` as the scalar type ``kind``, or ``_NO_MATCH``.

    Strict: a bool only for bool (``"no"`` would be truthy), an integral number for int (not ``4.5``, not
    ``"4"``, not a bool), a real number for float (an int is widened), a str for str. Lenient adds numbers for str
    (YAML reads an unquoted ``merge: 4`` as an int). Annotations other than these are not checked."""
    is_bool = isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool is no Python bool
    if kind is bool:
        return bool(value) if is_bool else _NO_MATCH
    if kind is int:
        return int(value) if isinstance(value, numbers.Integral) and not is_bool else _NO_MATCH
    if kind is float:
        return float(value) if isinstance(value, numbers.Real) and not is_bool else _NO_MATCH
    if kind is str:
        if isinstance(value, str):
            return value
        return str(value) if lenient and isinstance(value, numbers.Real) and not is_bool else _NO_MATCH
    return value if not isinstance(kind, type) or isinstance(value, kind) else _NO_MATCH


def _as_member(value, member, lenient: bool):
    """``value`` as one alternative ``member`` of a field's annotation, or ``_NO_MATCH``. A ``list[X]`` takes a
    list or tuple of X, and leniently a single X as a one-element list (YAML ``reward_weights: 1.0``)."""
    if member is type(None):
        return None if value is None else _NO_MATCH
    if typing.get_origin(member) is not list:
        return _as_scalar(value, member, lenient)
    (item,) = typing.get_args(member) or (object,)
    if isinstance(value, (list, tuple)):
        items = [_as_scalar(element, item, lenient) for element in value]
        return _NO_MATCH if any(element is _NO_MATCH for element in items) else items
    if not lenient or isinstance(value, (dict, set, frozenset)):
        return _NO_MATCH
    element = _as_scalar(value, item, lenient)
    return _NO_MATCH if element is _NO_MATCH else [element]


def _type_hint(name: str, value, annotation) -> str:
    """The likely cause and fix of a value of the wrong type, for the error message."""
    members = _union_members(annotation)
    takes_text = any(member is str or typing.get_args(member) == (str,) for member in members)
    if isinstance(value, bool) and takes_text:
        return (
            f" YAML 1.1 (and so a --config file) reads the unquoted words {YAML_BOOLEAN_WORDS[value]} as the "
            f'boolean {value}: quote the word you meant, e.g. {name}: "{"no" if value is False else "yes"}".'
        )
    if isinstance(value, str) and bool in members:
        return " Pass True or False: a non-empty string such as 'no' is truthy and would turn it on."
    if isinstance(value, str) and (int in members or float in members):
        try:
            number = float(value)
        except ValueError:
            return ""
        if int in members and number.is_integer():
            number = int(number)
        hint = f" Pass the number itself, not a string: {name}={number!r}."
        mantissa = value.lower().partition("e")[0]
        if "e" in value.lower() and "." not in mantissa:  # YAML 1.1 reads 1e-4 (no dot) as a string
            hint += f" In YAML write {value.strip().lower().replace('e', '.0e', 1)}: YAML 1.1 reads {value} as text."
        return hint
    if isinstance(value, float) and int in members:
        return " Pass a whole number."
    return ""


def coerce_field_types(config) -> None:
    """Check every field of the dataclass ``config`` against its annotation, in place.

    Derived from the annotations, so every field is covered: an ``int`` field refuses ``4.5``, ``"4"`` and
    booleans; a ``float`` field takes ints (as floats) and refuses strings; a ``bool`` field takes only booleans
    (``compile_transformer="no"`` would be truthy); ``X | None`` takes None; a ``list[X]`` field takes a list or
    tuple of X, or one X as a one-element list (YAML ``lora_target_modules: to_q``); a ``str`` field takes a number
    as its text (YAML ``merge: 4``). A YAML boolean in a field listed in ``_BOOLEAN_MEANINGS`` becomes the value
    it stands for.

    Raises:
        ValueError: ``<field>=<value> (<type>) is not allowed: <field> must be <type>``, with the likely cause
            (e.g. a YAML word read as a boolean) and the fix.
    """
    for name, annotation in _field_annotations(type(config)).items():
        value = getattr(config, name)
        if isinstance(value, bool) and name in _BOOLEAN_MEANINGS:
            setattr(config, name, _BOOLEAN_MEANINGS[name][value])
            continue
        members = _union_members(annotation)
        for lenient in (False, True):
            matches = (_as_member(value, member, lenient) for member in members)
            coerced = next((match for match in matches if match is not _NO_MATCH), _NO_MATCH)
            if coerced is not _NO_MATCH:
                break
        if coerced is _NO_MATCH:
            raise ValueError(
                f"{name}={value!r} ({type(value).__name__}) is not allowed: {name} must be "
                f"{_describe_type(annotation)}.{_type_hint(name, value, annotation)}"
            )
        setattr(config, name, coerced)


def check_mixed_precision_on_device(mixed_precision: str, device_type: str) -> None:
    """Refuse a mixed precision that accelerate would silently drop on ``device_type``.

    On a CPU accelerate turns fp16 off without a word (no autocast: the run is float32 in full, slower than the
    user planned and not what the config says), while bf16 autocasts. Measured with accelerate 1.16, torch 2.14:
    ``Accelerator(mixed_precision="fp16")`` on CPU has ``native_amp=False`` and ``autocast()`` computes float32.

    Raises:
        ValueError: fp16 on a CPU, with the two settings that work.
    """
    if mixed_precision == "fp16" and device_type == "cpu":
        raise ValueError(
            "mixed_precision='fp16' is not allowed on a CPU: accelerate has no fp16 autocast there and would "
            "silently train in float32. Set mixed_precision='bf16' (autocasts on CPUs) or 'no' (float32), or run "
            "on a GPU."
        )


def resolve_trackers(report_to: str | None, log_with: str | None) -> str | None:
    """The trackers of a config that names them as ``report_to`` (TRL's name), ``log_with`` (accelerate's), or both.

    ``"none"`` (any case, TRL's spelling of no tracker) and ``""`` mean no tracker; None means not given.

    Raises:
        ValueError: both names are given, with different trackers (``report_to: none`` on the command line over a
            recipe's ``log_with: wandb`` included: the run would otherwise log to the tracker it was told not to).
    """

    def trackers(value: str | None) -> str | None:
        return None if value is None or value.strip().lower() in ("", "none") else value

    if report_to is not None and log_with is not None and trackers(report_to) != trackers(log_with):
        raise ValueError(
            f"report_to={report_to!r} and log_with={log_with!r} disagree: they are the same option (TRL's and "
            "accelerate's name for the trackers). Give only one, e.g. replace log_with by report_to in the recipe."
        )
    return trackers(report_to if report_to is not None else log_with)


@dataclass
class EGRPOConfig:
    r"""Configuration of :class:`~trl_flow_egrpo.EGRPOTrainer`.

    Every field is documented in its ``metadata["help"]`` (shown by ``--help`` of ``HfArgumentParser``)
    and in ``docs/configuration.md``. Grouped as: output and logging; sampling schedule and SDE;
    entropy-aware merging; rollouts; policy update; optimization; model (LoRA, precision); rewards and
    data; checkpointing.
    """

    # --- output, logging, reproducibility -------------------------------------------------------
    output_dir: str = _doc("Where checkpoints, logs and the final model are written.", default="egrpo-output")
    seed: int = _doc("Seed of the data order, initial noise and SDE noise (each process adds its rank).", default=42)
    max_steps: int = _doc("Number of E-GRPO iterations (sample rollouts, then update). Paper: 300.", default=300)
    logging_steps: int = _doc("Log metrics to the trackers every this many iterations.", default=1)
    report_to: str | None = _doc(
        "Comma-separated trackers the metrics go to ('tensorboard', 'wandb', 'trackio', 'all'; accelerate's "
        "trackers), or None / 'none' for none. TRL's name; log_with is the same option under accelerate's name.",
        default=None,
    )
    log_with: str | None = _doc(
        "The same as report_to (accelerate's name for it, kept for existing recipes): give one of the two.",
        default=None,
    )
    tracker_project_name: str = _doc("Project name handed to the trackers.", default="trl-flow-egrpo")
    run_name: str | None = _doc("Run name for the trackers (default: the output_dir's name).", default=None)
    disable_tqdm: bool = _doc("Hide the progress bar.", default=False)

    # --- algorithm (docs/algorithms.md) ---------------------------------------------------------------
    algorithm: str = _doc(
        "'e-grpo' (entropy-aware branching, the default), or a baseline of the GRPO family sharing everything "
        "else: 'flow-grpo' (G independent SDE trajectories per prompt), 'dance-grpo' (constant-noise SDE, one "
        "initial noise per group, random steps trained), 'mix-grpo' (SDE only in a sliding window of steps), "
        "'mix-grpo-flash' (MixGRPO with a compressed DPM-Solver++ 2M ODE after the window). Beyond the GRPO family, "
        "trained on forward-noised ODE samples: 'diffusion-nft' (DiffusionNFT: implicit positive and negative "
        "policies around an EMA old policy) and 'awm' (advantage-weighted flow matching, PPO-clipped).",
        default="e-grpo",
    )
    timestep_fraction: float | None = _doc(
        "Flow-GRPO / DanceGRPO: the fraction of each trajectory's steps that is trained (Flow-GRPO: the first "
        "int(T * fraction) steps; DanceGRPO: int((T - 1) * fraction) steps drawn at random per trajectory from "
        "the first T - 1, as its official code). DiffusionNFT / AWM: int(T * fraction) of the T schedule times, "
        "drawn per sample, at which each ODE sample is forward-noised and trained. None: the algorithm's default "
        "(Flow-GRPO 0.99, DanceGRPO 0.6, DiffusionNFT 0.99, AWM 0.9).",
        default=None,
    )
    nft_beta: float = _doc(
        "DiffusionNFT: beta of its implicit policies (1 - beta) v_old + beta v (positive) and (1 + beta) v_old - "
        "beta v (negative), in (0, 1]. Official: 1.0 (0.1 for OCR).",
        default=1.0,
    )
    old_policy_decay_rate: float = _doc(
        "DiffusionNFT: the EMA decay of its old (sampling) policy grows by this per optimizer step, from 0 (on-policy) "
        "up to old_policy_decay_max; after each iteration old <- decay * old + (1 - decay) * current. Official: 0.001.",
        default=0.001,
    )
    old_policy_decay_max: float = _doc(
        "DiffusionNFT: the largest EMA decay of its old policy, in [0, 1). Official: 0.5.", default=0.5
    )
    dance_eta: float = _doc(
        "DanceGRPO: the constant diffusion coefficient eta of its SDE. DanceGRPO: 0.3.", default=0.3
    )
    mix_window_size: int = _doc(
        "MixGRPO: SDE (and trained) steps in the window; the window never covers the last two steps, so it is "
        "shorter near the end of the schedule (as the official code). MixGRPO: 4.",
        default=4,
    )
    mix_shift_interval: int | None = _doc(
        "MixGRPO: iterations between two moves of the window. None: the algorithm's default (MixGRPO: 25, "
        "MixGRPO-Flash: 20, as the official scripts).",
        default=None,
    )
    mix_window_stride: int = _doc(
        "MixGRPO: steps the window moves later each time (back to step 0 once it would start at step T - 2 or "
        "later). 0 freezes the window at step 0 (MixGRPO-Flash*). MixGRPO: 1.",
        default=1,
    )
    mix_flash_fraction: float = _doc(
        "MixGRPO-Flash: share of the steps after the window that its DPM-Solver++ 2M ODE keeps: "
        "max(1, int((n + 1) * fraction) - 1) of the n remaining intervals, evenly spaced in index, as the official "
        "dpm_post_compress_ratio. Official: 0.4; 0.2 with the frozen window (mix_window_stride=0).",
        default=0.4,
    )
    completion_solver: str = _doc(
        "E-GRPO: the deterministic ODE that completes each rollout after its merged SDE step (METHOD.md 4b): "
        "'euler' (the paper, the default) or 'dpmpp_2m' (DPM-Solver++ 2M in data prediction, the documented "
        "efficient option with completion_steps_fraction < 1). The stochastic step, its log-probability, the merge "
        "plan and the anchor do not change, so the on-policy ratio stays exactly 1.",
        default="euler",
    )
    completion_steps_fraction: float = _doc(
        "E-GRPO: share of the n remaining intervals a completion keeps, in (0, 1]: max(1, ceil(n * fraction)) "
        "intervals evenly spaced in schedule index, always ending at sigma 0 (trl_flow_egrpo.solvers."
        "completion_indices; METHOD.md 4b). 1 = every step. Below 1 use completion_solver='dpmpp_2m' (second "
        "order); Euler on the subset is allowed but first order. On the testbed, dpmpp_2m at 0.4 keeps an advantage "
        "correlation of 0.995 with the full completion at 45 percent of the rows (docs/concepts.md).",
        default=1.0,
    )
    completion_granularities: list[int] = _doc(
        "E-GRPO: strides of the completions each rollout gets (METHOD.md 4b, the authors' granular_list; not in "
        "the paper). With [1, 2] each rollout's x' is also completed on every 2nd remaining index, the rewards of "
        "each stride form their own groups, and the groups' advantages are added for the one trained step. "
        "Default [1]: one completion.",
        default_factory=lambda: [1],
    )
    advantage_std: str | None = _doc(
        "The std that normalizes rewards: 'group' (each group's own, METHOD.md section 5) or 'batch' (the std of "
        "all rewards of the iteration over all processes, each group keeping its own mean: Flow-GRPO's "
        "global_std). None: the algorithm's default ('batch' for flow-grpo, 'group' otherwise).",
        default=None,
    )

    # --- schedule and SDE (METHOD.md sections 1-2) ------------------------------------------------
    num_inference_steps: int = _doc("T, sampling steps per rollout. Paper: 16.", default=16)
    shift: float | None = _doc(
        "Static time shift of the schedule (paper: 3.0). None keeps the pipeline scheduler's own shift "
        "(e.g. FLUX.1-dev's resolution-dependent dynamic shift).",
        default=3.0,
    )
    noise_level: float = _doc("a, the SDE noise level of the stochastic step (> 0). Paper: 0.7.", default=0.7)
    sde_type: str = _doc(
        "The sampler of the stochastic steps: 'sde' (Flow-GRPO's SDE, METHOD.md section 2, the paper) or 'cps' "
        "(coefficient-preserving sampling: noise std sigma' * sin(a * pi / 2), so the sample keeps its noise scale; "
        "needs noise_level <= 1). Used by e-grpo (its entropy and merge plan too, docs/concepts.md), flow-grpo, "
        "mix-grpo and mix-grpo-flash; dance-grpo has its own constant-noise SDE and refuses 'cps'. Under 'cps' a "
        "step landing at sigma 0 has no noise, so the last step cannot be trained.",
        default="sde",
    )

    # --- entropy-aware merging (METHOD.md section 3) ----------------------------------------------
    entropy_threshold: float = _doc(
        "tau: a step with exp(h) >= tau is trained alone; lower-entropy steps are merged with the next "
        "intervals until the merged step's exp(h) reaches tau. 0 disables merging. Paper: 2.2.",
        default=2.2,
    )
    num_active_steps: int = _doc(
        "Train the steps starting at the first this many schedule indices. Paper: 8.", default=8
    )
    first_active_step: int = _doc(
        "Index of the first trained step (0 = the paper's 'first 8'; 8 with 8 active steps of 16 = its 'second "
        "half' ablation).",
        default=0,
    )
    merge: str = _doc(
        "'adaptive' (entropy-driven lengths), 'none' (every step alone), or an integer (fixed merge "
        "length for all steps, the paper's ablation).",
        default="adaptive",
    )
    merge_windows: str = _doc(
        "'overlap': every active index starts a merged step (Algorithm 1); 'partition': the next merged "
        "step starts where the previous one ended.",
        default="overlap",
    )

    # --- rollouts (METHOD.md section 4) -----------------------------------------------------------
    num_generations: int = _doc("G, rollouts per (prompt, merged step) group (>= 2). Paper code: 12.", default=12)
    prompts_per_device: int = _doc("Prompts per process per iteration. Paper: 1 per GPU on 8 GPUs.", default=1)
    height: int = _doc("Image height in pixels. Authors' code: 720.", default=720)
    width: int = _doc("Image width in pixels. Authors' code: 720.", default=720)
    num_frames: int | None = _doc(
        "Video pipelines (Wan): frames per video, 4k + 1 (Wan's VAE compresses 4 frames into one latent frame). "
        "None uses the family's default (Wan: 81); must stay None for image pipelines.",
        default=None,
    )
    guidance_scale: float | None = _doc(
        "The model family's guidance: FLUX.1-dev's / FLUX.2 [dev]'s guidance embedding (3.5 / 4.0 by default) or "
        "the classifier-free guidance scale of SD3 (4.5), FLUX.2 [klein] base (4.0), Qwen-Image (its "
        "true_cfg_scale, 4.0) and Z-Image (ZImagePipeline's guidance_scale, 5.0; 0 turns guidance off, as "
        "Z-Image-Turbo samples). Finite; None uses the family's default.",
        default=None,
    )
    negative_prompt: str = _doc(
        "Negative prompt for families with classifier-free guidance (SD3, FLUX.2 [klein] base, Qwen-Image, "
        "Z-Image, Wan); refused where the pipeline has no negative pass: FLUX.1, FLUX.2 [dev], and every family "
        "with guidance off (guidance_scale <= 1; Z-Image: 0), where it would never be used.",
        default="",
    )
    max_sequence_length: int = _doc("Text-encoder token length of the prompt encoding (at most 512).", default=512)
    rollout_batch_size: int = _doc(
        "Transformer rows per forward call while sampling (anchors and branches of all prompts and steps "
        "share calls, with per-sample timesteps).",
        default=16,
    )
    decode_batch_size: int | None = _doc(
        "Images per VAE decode call. Small by default: a 720x720 FLUX decode takes about 0.9 GiB per image. "
        "None: rollout_batch_size.",
        default=4,
    )
    offload_text_encoders: bool = _doc(
        "Keep the text encoders in CPU memory between prompt encodings; they visit the GPU only to encode "
        "(frees about 9 GiB for FLUX.1-dev's T5-XXL). No effect on CPU runs.",
        default=True,
    )
    prompt_cache_dir: str | None = _doc(
        "Cache prompt embeddings on disk here, one file per prompt keyed by model and prompt: each prompt is "
        "encoded once, across iterations and runs (trl_flow_egrpo.prompts.PromptEncoder.warm precomputes a "
        "dataset's). A directory (created if missing), not a file. None: encode every time.",
        default=None,
    )

    # --- policy update (METHOD.md sections 5-6) -----------------------------------------------------
    clip_range: float = _doc("PPO clip range epsilon on the ratio. Paper: 1e-4.", default=1e-4)
    advantage_clip: float = _doc("A_max: advantages are clipped to [-A_max, A_max]. Reference code: 5.", default=5.0)
    advantage_eps: float = _doc("Added to the group std when normalizing rewards.", default=1e-8)
    beta: float | None = _doc(
        "Weight of a KL penalty to the frozen base model (LoRA disabled; a frozen copy when full "
        "fine-tuning). 0 = no penalty, as in the paper. None: the algorithm's default (0.01 for flow-grpo, as "
        "its official PickScore config; 1e-4 for diffusion-nft, on its velocity KL mean((v - v_ref)^2); 0 "
        "otherwise).",
        default=None,
    )
    per_device_train_batch_size: int = _doc(
        "Groups per forward/backward micro-batch in the update (one forward per group serves its G "
        "ratios). Gradients accumulate over all micro-batches of an optimizer step.",
        default=1,
    )
    optimizer_step: str = _doc(
        "'active_step': one optimizer step per merged step of the plan, over all groups of that step (the "
        "authors' code, which produced the paper's numbers; the PPO clip acts from the second step of an "
        "iteration on, so a clip fraction above 0 is expected). 'iteration': one optimizer step per iteration "
        "over all groups (Algorithm 1 read literally; with one inner epoch every ratio is then exactly 1 and "
        "the clip never acts).",
        default="active_step",
    )
    num_inner_epochs: int = _doc("Passes over each iteration's rollouts (PPO epochs). Paper: 1.", default=1)
    ratio_normalization: bool = _doc(
        "GRPO-Guard's ratio normalization (Wang et al. 2025, arXiv 2510.22319): the clip acts on "
        "exp(s * (log r + mean((mu - mu_old)^2) / (2 s^2))) instead of r, s the step's std, mu and mu_old its mean "
        "now and at sampling. This removes the ratio's left shift and its growth on low-noise steps: mean 0 and the "
        "same spread at every step in log space, exactly 1 on-policy (trl_flow_egrpo.loss.normalized_log_ratio). "
        "Works with every algorithm (E-GRPO's merged steps included). Costs one forward per trained step and "
        "iteration before the first optimizer step, to record mu_old (shared with compile_transformer's log-prob "
        "recomputation). Its gradients are s times the raw ones: step_reweighting evens them out across steps. "
        "Off by default (not part of E-GRPO).",
        default=False,
    )
    step_reweighting: bool = _doc(
        "GRPO-Guard's gradient reweighting, with ratio_normalization: each trained step's loss term is weighted by "
        "1 / (T * (sigma_k - sigma_{k+l})), its interval's inverse (the paper's 1/dt, here times 1/T so that a "
        "uniform schedule's weights are 1), which gives every step the same gradient per unit of velocity "
        "(trl_flow_egrpo.loss.step_weights). For Flow-GRPO's SDE (sde_type='sde'): refused with dance-grpo and "
        "sde_type='cps'. Off by default.",
        default=False,
    )

    # --- optimization -----------------------------------------------------------------------------
    learning_rate: float = _doc(
        "AdamW learning rate. Default 1e-4 suits LoRA; the paper's full fine-tune uses 2e-6.", default=1e-4
    )
    adam_beta1: float = _doc("AdamW beta1.", default=0.9)
    adam_beta2: float = _doc("AdamW beta2.", default=0.999)
    adam_epsilon: float = _doc("AdamW epsilon.", default=1e-8)
    weight_decay: float = _doc("AdamW weight decay. Paper: 1e-4.", default=1e-4)
    max_grad_norm: float | None = _doc("Gradient-norm clipping (> 0). Paper: 1.0. None disables it.", default=1.0)
    lr_scheduler_type: str = _doc(
        "transformers learning-rate schedule name ('constant', 'cosine', ...).", default="constant"
    )
    warmup_steps: int = _doc("Learning-rate warm-up, in optimizer steps.", default=0)

    # --- model ------------------------------------------------------------------------------------
    use_peft: bool = _doc("Train a LoRA (peft) on the transformer; False = full fine-tuning.", default=True)
    lora_r: int = _doc("LoRA rank (>= 1).", default=32)
    lora_alpha: int = _doc("LoRA alpha (scale = alpha / r; >= 1).", default=64)
    lora_dropout: float = _doc("LoRA dropout.", default=0.0)
    lora_target_modules: list[str] | None = _doc(
        "Module names the LoRA targets (default: the model family's attention and MLP projections). A single name "
        "is taken as a one-element list.",
        default=None,
    )
    mixed_precision: str = _doc(
        "accelerate mixed precision: 'no', 'fp16' or 'bf16' (quote 'no' in YAML, which reads a bare no as false). "
        "'fp16' is refused on a CPU, where accelerate would silently run float32. Paper: bf16.",
        default="bf16",
    )
    gradient_checkpointing: bool = _doc("Recompute activations in the backward pass to save memory.", default=False)
    allow_tf32: bool = _doc("Allow TF32 matmuls on Ampere+ GPUs.", default=True)
    quantization: str | None = _doc(
        "Store the frozen base transformer's linear weights quantized, LoRA on top in float32 (needs "
        "use_peft; docs/memory-24gb.md). 'int8-weight-only' or 'float8-weight-only' (torchao, applied by the "
        "trainer to the loaded transformer, layer by layer on its way to the GPU), 'nf4' (bitsandbytes: load the "
        "transformer with trl_flow_egrpo.quantization.nf4_pipeline_quantization_config(); the trainer checks "
        "it). None: bf16/fp32 weights as loaded.",
        default=None,
    )
    optimizer: str = _doc(
        "'adamw' (torch AdamW, float32 state: 8 B per trained parameter) or 'adamw_8bit' (bitsandbytes' "
        "8-bit AdamW, 2 B per trained parameter; the quantization extra).",
        default="adamw",
    )

    # --- rewards and data -------------------------------------------------------------------------
    reward_weights: list[float] | None = _doc(
        "One weight per reward function (default: all 1; a single number is a one-element list). Finite, not all 0, "
        "absolute values summing to at most 1e6 (the weighted rewards are summed in float32).",
        default=None,
    )
    reward_aggregation: str = _doc(
        "With several rewards: 'advantage' normalizes each reward in its group, then sums with the weights "
        "(scale-free); 'sum' sums the weighted raw rewards, then normalizes.",
        default="advantage",
    )
    async_rewards: bool = _doc(
        "Score each prompt's images in a worker thread while the next prompt's rollouts are sampled. Sampling "
        "then runs prompt by prompt (smaller transformer batches): it pays only when scoring is slow and does "
        "not compete for the same device (CPU-bound rewards, a reward model on another GPU).",
        default=False,
    )
    prompt_column: str = _doc("Dataset column holding the prompts.", default="prompt")
    image_column: str = _doc(
        "Dataset column holding each prompt's source image, for image-editing pipelines (FLUX.1 Kontext, "
        "Qwen-Image-Edit): a file path, a PIL image or an RGB array [H, W, 3] per row, checked when the trainer is "
        "built and resized to one size per run. Rewards receive the loaded images in this column (docs/editing.md). "
        "Text-to-image pipelines ignore it.",
        default="source_image",
    )
    shuffle_dataset: bool = _doc("Shuffle the prompts each epoch (seeded).", default=True)

    # --- checkpointing --------------------------------------------------------------------------
    save_steps: int = _doc("Write a checkpoint every this many iterations (0: never).", default=50)
    save_total_limit: int | None = _doc(
        "Keep at most this many checkpoints (>= 1; the oldest are deleted, the newest never). None keeps all.",
        default=None,
    )
    resume_from_checkpoint: str | None = _doc(
        "Resume from this checkpoint directory, or 'true' for the newest intact one in output_dir (damaged ones "
        "are skipped with a warning; a named damaged one is refused). Checkpoints later than the one resumed (or, "
        "without resuming, any in output_dir) belong to an abandoned run and are renamed to "
        "checkpoint-N.abandoned-<time>, kept but never resumed, pruned or uploaded.",
        default=None,
    )

    # --- evaluation -----------------------------------------------------------------------------------
    eval_steps: int = _doc(
        "Evaluate every this many iterations (0: never): deterministic ODE samples of the eval prompts with "
        "fixed seeds, scored by the training and evaluation rewards, logged as metrics and an image grid.",
        default=0,
    )
    eval_seed: int = _doc(
        "Seed of eval prompt i's initial noise is eval_seed + i (the same every evaluation).", default=0
    )
    eval_grid_images: int = _doc("Eval images shown in the logged image grid.", default=16)

    # --- Hugging Face Hub -------------------------------------------------------------------------
    push_to_hub: bool = _doc("Push the trained model and its model card to the Hub (see hub_strategy).", default=False)
    hub_model_id: str | None = _doc("Hub repository 'user/name' (default: the output_dir's name).", default=None)
    hub_private: bool = _doc("Create the Hub repository as private.", default=False)
    hub_strategy: str = _doc(
        "'end': push once after training; 'every_save': also push at every checkpoint.", default="end"
    )
    hub_token: str | None = _doc(
        "Hub token (default: the logged-in token / HF_TOKEN). Used for the Hub calls only, never written: "
        "checkpoints, tracker configs, logs, the model card and the uploads show it as '***' "
        "(trl_flow_egrpo.redaction).",
        default=None,
        repr=False,  # repr(config) in a log line or a traceback must not show it either
    )

    # --- speed (docs/performance.md) --------------------------------------------------------------------
    compile_transformer: bool = _doc(
        "torch.compile the transformer's repeated blocks (regional compilation) after the LoRA is added; the "
        "compiled model samples and trains, so on-policy ratios stay 1. Costs a compilation at the first "
        "sampling and the first update (minutes for FLUX.1-dev), then runs faster on GPUs.",
        default=False,
    )
    compile_mode: str = _doc(
        "torch.compile mode of compile_transformer: 'default', 'max-autotune-no-cudagraphs' (slower compile, "
        "autotuned matmuls), 'reduce-overhead' or 'max-autotune' (these two add CUDA graphs).",
        default="default",
    )
    attention_backend: str | None = _doc(
        "diffusers attention dispatcher backend of the transformer: 'native' (PyTorch SDPA), '_native_flash', "
        "'_native_cudnn', '_native_efficient' (one SDPA kernel forced), 'flash' (flash-attn package), ... "
        "(trl_flow_egrpo.acceleration.attention_backends() lists them). None: the model's default (SDPA).",
        default=None,
    )
    lora_input_cast: bool = _doc(
        "Keep peft's cast of every LoRA layer's input to float32. Under bf16/fp16 mixed precision the LoRA "
        "matmuls run in half precision anyway, so the cast is a copy that changes no value: False (default) "
        "skips it, in sampling and update alike. Without mixed precision the cast always stays.",
        default=False,
    )
    peak_tflops: float | None = _doc(
        "The device's dense peak in TFLOP/s that the logged time/sampling_mfu divides by. None: looked up by CUDA "
        "device name (H100, H200, A100, ...; no MFU for unknown devices and CPUs).",
        default=None,
    )

    def __post_init__(self):
        def refuse(name: str, allowed: str):
            raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: {name} must be {allowed}.")

        coerce_field_types(self)  # first: the checks below compare numbers and strings
        self.report_to = self.log_with = resolve_trackers(self.report_to, self.log_with)
        if self.num_generations < 2:
            refuse(
                "num_generations", ">= 2 (advantages are normalized within a group of G rollouts; the paper uses 12)"
            )
        if not 1 <= self.num_active_steps <= self.num_inference_steps:
            refuse(
                "num_active_steps",
                f"between 1 and num_inference_steps ({self.num_inference_steps}): it counts "
                "the trained steps among the sampling steps",
            )
        if not 0 <= self.first_active_step <= self.num_inference_steps - self.num_active_steps:
            refuse(
                "first_active_step",
                f"between 0 and num_inference_steps - num_active_steps "
                f"({self.num_inference_steps - self.num_active_steps})",
            )
        if not (math.isfinite(self.noise_level) and self.noise_level > 0):
            refuse("noise_level", "a finite number > 0 (the SDE noise of the one stochastic step)")
        if not (math.isfinite(self.entropy_threshold) and self.entropy_threshold >= 0):
            refuse("entropy_threshold", "a finite number >= 0 (0 disables merging; the paper uses 2.2)")
        _ = self.merge_length  # validates `merge`
        checks = {
            "merge_windows": ("overlap", "partition"),
            "optimizer_step": ("active_step", "iteration"),
            "reward_aggregation": ("advantage", "sum"),
            "mixed_precision": ("no", "fp16", "bf16"),
            "hub_strategy": ("end", "every_save"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                refuse(name, f"one of {allowed}")
        for name in (
            "max_steps",
            "prompts_per_device",
            "rollout_batch_size",
            "per_device_train_batch_size",
            "num_inner_epochs",
            "logging_steps",
            "eval_grid_images",
            "num_inference_steps",
            "max_sequence_length",
            "height",
            "width",
        ):
            if getattr(self, name) < 1:
                refuse(name, ">= 1")
        if self.max_sequence_length > 512:
            refuse("max_sequence_length", "<= 512 (the text encoders' limit in the pipelines)")
        algorithms = ("e-grpo", "flow-grpo", "dance-grpo", "mix-grpo", "mix-grpo-flash", "diffusion-nft", "awm")
        if self.algorithm not in algorithms:
            refuse("algorithm", f"one of {', '.join(map(repr, algorithms))}")
        if not (math.isfinite(self.nft_beta) and 0 < self.nft_beta <= 1):
            refuse("nft_beta", "in (0, 1] (the weight of the trained policy in DiffusionNFT's implicit policies)")
        if not (math.isfinite(self.old_policy_decay_rate) and self.old_policy_decay_rate >= 0):
            refuse("old_policy_decay_rate", "a finite number >= 0 (0 keeps the old policy equal to the current one)")
        if not 0 <= self.old_policy_decay_max < 1:
            refuse("old_policy_decay_max", "in [0, 1) (at 1 the old policy would never move)")
        if self.ratio_normalization and self.algorithm in ("diffusion-nft", "awm"):
            raise ValueError(
                f"ratio_normalization=True is not allowed with algorithm={self.algorithm!r}: GRPO-Guard normalizes "
                "the ratios of Gaussian sampling steps, and this algorithm trains on forward-noised ODE samples, "
                "which have none. Leave ratio_normalization off."
            )
        if self.timestep_fraction is not None and not 0 < self.timestep_fraction <= 1:
            refuse("timestep_fraction", "in (0, 1], or None for the algorithm's default")
        if not (math.isfinite(self.dance_eta) and self.dance_eta > 0):
            refuse("dance_eta", "a finite number > 0")
        if self.sde_type not in ("sde", "cps"):
            refuse("sde_type", "'sde' (Flow-GRPO's SDE, the default) or 'cps' (coefficient-preserving sampling)")
        if self.sde_type == "cps" and self.algorithm == "dance-grpo":
            raise ValueError(
                "sde_type='cps' is not allowed with algorithm='dance-grpo': DanceGRPO samples with its own "
                "constant-noise SDE (dance_eta), which has no CPS form. Use sde_type='sde', or a CPS-capable "
                "algorithm: 'e-grpo', 'flow-grpo', 'mix-grpo' or 'mix-grpo-flash'."
            )
        if self.sde_type == "cps" and self.noise_level > 1:
            refuse("noise_level", "<= 1 with sde_type='cps' (the CPS angle a * pi / 2 stops at fully fresh noise)")
        if not 1 <= self.mix_window_size <= self.num_inference_steps:
            refuse("mix_window_size", f"between 1 and num_inference_steps ({self.num_inference_steps})")
        if self.mix_shift_interval is not None and self.mix_shift_interval < 1:
            refuse("mix_shift_interval", ">= 1, or None for the algorithm's default")
        if self.mix_window_stride < 0:
            refuse("mix_window_stride", ">= 0 (0 freezes the window at step 0)")
        if not 0 < self.mix_flash_fraction <= 1:
            refuse("mix_flash_fraction", "in (0, 1] (the share of the steps after the window that are kept)")
        if self.completion_solver not in ("euler", "dpmpp_2m"):
            refuse("completion_solver", "'euler' (every remaining step, the paper) or 'dpmpp_2m' (DPM-Solver++ 2M)")
        if not 0 < self.completion_steps_fraction <= 1:
            refuse("completion_steps_fraction", "in (0, 1] (the share of the remaining steps a completion keeps)")
        granularities = self.completion_granularities
        if not granularities or len(set(granularities)) != len(granularities) or min(granularities) < 1:
            refuse("completion_granularities", "a non-empty list of distinct integers >= 1, e.g. [1] or [1, 2]")
        custom_completion = (self.completion_solver, self.completion_steps_fraction, list(granularities))
        if self.algorithm != "e-grpo" and custom_completion != ("euler", 1.0, [1]):
            raise ValueError(
                f"completion_solver, completion_steps_fraction and completion_granularities are E-GRPO's options, "
                f"but algorithm={self.algorithm!r}: leave them at 'euler', 1.0 and [1] (MixGRPO-Flash has "
                f"mix_flash_fraction)."
            )
        if self.advantage_std not in (None, "group", "batch"):
            refuse("advantage_std", "'group', 'batch', or None for the algorithm's default")
        if self.step_reweighting and not self.ratio_normalization:
            refuse(
                "step_reweighting",
                "False without ratio_normalization: the weights even out the normalized ratio's gradients (s times "
                "the raw ones); set ratio_normalization=True as well, or leave step_reweighting off",
            )
        if self.step_reweighting and (self.algorithm == "dance-grpo" or self.sde_type != "sde"):
            raise ValueError(
                f"step_reweighting=True is not allowed with algorithm={self.algorithm!r} and "
                f"sde_type={self.sde_type!r}: its 1/interval weights even out the steps of Flow-GRPO's SDE only "
                "(sde_type='sde', whose mean moves with the velocity by a constant multiple of the interval); "
                "DanceGRPO's constant-noise SDE and CPS steps have other multiples. Leave step_reweighting off "
                "(ratio_normalization works with every algorithm and sampler)."
            )
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta >= 0):
            refuse("beta", "a finite number >= 0, or None for the algorithm's default")
        for name in ("save_steps", "eval_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                refuse(name, ">= 0 (0 turns it off)")
        if self.decode_batch_size is not None and self.decode_batch_size < 1:
            refuse("decode_batch_size", ">= 1, or None")
        from .acceleration import COMPILE_MODES  # here, not at the top: the config imports without torch

        if self.compile_mode not in COMPILE_MODES:
            refuse("compile_mode", f"one of {COMPILE_MODES}")
        if self.attention_backend is not None:
            from .acceleration import check_attention_backend

            check_attention_backend(self.attention_backend)
        if self.peak_tflops is not None and not (math.isfinite(self.peak_tflops) and self.peak_tflops > 0):
            refuse("peak_tflops", "a finite number > 0 (TFLOP/s), or None to look it up by GPU name")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            refuse("save_total_limit", ">= 1 (the newest checkpoint is always kept), or None to keep all")
        for name in ("learning_rate", "clip_range", "advantage_clip", "advantage_eps"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                refuse(name, "a finite number > 0")
        for name in ("weight_decay", "lora_dropout"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                refuse(name, "a finite number >= 0")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            refuse(
                "max_grad_norm",
                "a finite number > 0, or None to disable clipping (a negative norm flips the gradient's sign)",
            )
        if self.reward_weights is not None:
            if not all(math.isfinite(w) for w in self.reward_weights):
                refuse("reward_weights", "finite numbers")
            if not sum(abs(w) for w in self.reward_weights) <= REWARD_WEIGHT_SUM_LIMIT:  # inf fails too
                refuse(
                    "reward_weights",
                    f"numbers whose absolute values sum to at most {REWARD_WEIGHT_SUM_LIMIT:g}: the rewards are "
                    "weighted and summed in float32, where larger weights overflow to inf and the advantages to "
                    "NaN. Scale them down: with reward_aggregation='sum' only their ratios matter (e.g. [1.0, 1.0]), "
                    "with 'advantage' each weight scales its reward's normalized advantage (about 1)",
                )
            if not any(self.reward_weights):
                refuse("reward_weights", "weights that are not all 0 (every advantage would be 0: nothing is trained)")
        if self.guidance_scale is not None and not math.isfinite(self.guidance_scale):
            refuse("guidance_scale", "a finite number, or None for the model family's default")
        if self.lora_r < 1:
            refuse("lora_r", ">= 1 (the LoRA's rank)")
        if self.lora_alpha < 1:
            refuse("lora_alpha", ">= 1 (the LoRA's output is scaled by lora_alpha / lora_r: 0 trains nothing)")
        if self.prompt_cache_dir is not None and os.path.exists(self.prompt_cache_dir):
            if not os.path.isdir(self.prompt_cache_dir):
                refuse(
                    "prompt_cache_dir",
                    "a directory (it may not exist yet), but it is a file: point it at a directory or remove the file",
                )
        if self.quantization not in QUANTIZATION_METHODS:
            refuse("quantization", f"one of {QUANTIZATION_METHODS}")
        if self.quantization is not None and not self.use_peft:
            refuse(
                "quantization",
                "None when fully fine-tuning (use_peft=False): quantized weights cannot be "
                "trained; set use_peft=True to train a LoRA on the quantized base",
            )
        if self.optimizer not in OPTIMIZERS:
            refuse("optimizer", f"one of {OPTIMIZERS}")

    @property
    def merge_length(self) -> str | int | None:
        """``merge`` parsed for :func:`~trl_flow_egrpo.plan_merges`: ``"adaptive"``, an int, or None."""
        value = str(self.merge).strip().lower()
        if value == "adaptive":
            return "adaptive"
        if value in ("none", "0"):
            return None
        if value.isdigit():
            return int(value)
        raise ValueError(f"merge must be 'adaptive', 'none' or a positive integer, got {self.merge!r}.")

    def to_dict(self) -> dict:
        """The config as a JSON-serializable dict (for trackers, checkpoints and the model card), with secrets
        redacted (``hub_token`` -> ``"***"``, URL passwords; :func:`~trl_flow_egrpo.redaction.redact`): this is
        what every writer uses. ``dataclasses.asdict(config)`` gives the raw values."""
        return redact(asdict(self))
