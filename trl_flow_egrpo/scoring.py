"""Calling reward functions: names, validation, weights.

Rewards score what the pipeline generates: images ``[B, 3, H, W]`` or, for video pipelines (Wan), videos
``[B, F, 3, H, W]``, in [0, 1]; either way one float per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


def reward_name(reward_fn: Callable) -> str:
    """The name a reward is logged under: its ``name`` attribute, else its function or class name."""
    name = getattr(reward_fn, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(reward_fn, "__name__", None) or type(reward_fn).__name__


def reward_parse_failures(reward_fns: Sequence[Callable], names: Sequence[str]) -> dict[str, int]:
    """The replies each reward could not parse so far, by reward name, for the rewards that count them (an integer
    ``parse_failures`` attribute, as :class:`~trl_flow_egrpo.rewards.VLMJudgeReward` has); the trainer logs them
    as ``reward/<name>/parse_failures``."""
    counts = {
        name: getattr(reward_fn, "parse_failures", None) for reward_fn, name in zip(reward_fns, names, strict=True)
    }
    return {name: count for name, count in counts.items() if isinstance(count, int) and not isinstance(count, bool)}


def unique_reward_names(reward_fns: Sequence[Callable]) -> list[str]:
    """Reward names made unique by suffixing repeats (``clip``, ``clip_1``, ...)."""
    names, seen = [], {}
    for fn in reward_fns:
        base = reward_name(fn)
        count = seen.get(base, 0)
        names.append(base if count == 0 else f"{base}_{count}")
        seen[base] = count + 1
    return names


def validate_reward_fns(reward_fns) -> list[Callable]:
    """A non-empty list of callables, or a clear error."""
    if callable(reward_fns):
        reward_fns = [reward_fns]
    reward_fns = list(reward_fns or [])
    if not reward_fns:
        raise ValueError(
            "Pass at least one reward function: a callable fn(images, prompts, **columns) that "
            "returns one float per image (see trl_flow_egrpo.rewards)."
        )
    for fn in reward_fns:
        if not callable(fn):
            raise ValueError(f"Reward functions must be callables fn(images, prompts, **columns); got {fn!r}.")
    return reward_fns


def call_reward(
    name: str, reward_fn: Callable, images: torch.Tensor, prompts: list[str], columns: dict[str, list]
) -> torch.Tensor:
    """Call one reward and check its output: one finite float per image (or video), returned as float32 ``[B]``
    (CPU).

    Raises:
        ValueError: naming the reward, when it returns the wrong number of values, non-numbers, NaN or inf, a
            tensor on the meta device (no values), or fails on videos (an image reward handed videos: the message
            points to FrameAverageReward).
    """
    try:
        values = reward_fn(images, prompts, **columns)
    except (RuntimeError, ValueError, IndexError) as error:
        if images.dim() != 5:
            raise
        raise ValueError(
            f"Reward '{name}' failed on videos {tuple(images.shape)} ([B, F, 3, H, W]): {error} If it "
            "is an image reward, score videos with FrameAverageReward(<the reward>) (registry name "
            f"'frames_{name}'), which scores each frame as an image."
        ) from error
    not_numbers = ValueError(
        f"Reward '{name}' returned {type(values).__name__} that is not a sequence of numbers "
        f"(e.g. {_first_non_number(values)!r}): it must return one float per image (a list, numpy "
        "array or 1-D tensor)."
    )
    if isinstance(values, torch.Tensor):
        if values.is_complex():
            raise not_numbers
        if values.is_meta:
            raise ValueError(
                f"Reward '{name}' returned a tensor on the meta device, which holds no values: its model's weights "
                "were never loaded (e.g. built under init_empty_weights or with a device_map that left them on "
                "'meta'). Load the reward model's weights onto a real device (CPU or GPU) before training."
            )
        values = values.detach().to(device="cpu", dtype=torch.float32)
    else:
        try:
            array = np.asarray(values)
        except (TypeError, ValueError) as error:
            raise not_numbers from error
        # Only real numbers and booleans: numpy would silently parse strings like "0.5" into floats.
        if array.dtype.kind not in "biuf":
            raise not_numbers
        values = torch.as_tensor(array.astype(np.float32))
    values = values.reshape(-1) if values.dim() > 1 and values.numel() == len(images) else values
    return check_scores(values, len(images), name, prompts=prompts)


def _first_non_number(values):
    """The first item of ``values`` that is not a real number (for the error message), else ``values``."""
    try:
        return next(item for item in values if not isinstance(item, (int, float, np.number, np.bool_)))
    except Exception:  # not iterable, or nothing found: show the value itself
        return values


def check_scores(
    scores: torch.Tensor,
    expected: int,
    reward: str,
    prompts: Sequence[str] | None = None,
    hint: str = "Make the reward return finite values for every image, e.g. by handling blank or degenerate images.",
) -> torch.Tensor:
    """Check a reward's output: a 1-D tensor of ``expected`` finite values, else a ValueError naming ``reward``
    (and, given ``prompts``, a few prompts of the offending images) and ending with ``hint``."""
    if scores.dim() != 1 or scores.shape[0] != expected:
        raise ValueError(
            f"Reward '{reward}' returned {tuple(scores.shape)} values for {expected} images: it must "
            "return exactly one float per image, in the order of the images."
        )
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        where = bad.nonzero().flatten().tolist()
        examples = f"prompts e.g. {[prompts[i] for i in where[:3]]}" if prompts is not None else f"indices {where[:8]}"
        raise ValueError(
            f"Reward '{reward}' returned NaN or inf for {len(where)} of {expected} images ({examples}). {hint}"
        )
    return scores


def score_images(
    reward_fns: Sequence[Callable], names: Sequence[str], images: torch.Tensor, rows: Sequence[dict], prompt_column: str
) -> torch.Tensor:
    """Scores ``[B, R]`` of ``B`` images (or videos ``[B, F, 3, H, W]``) by ``R`` rewards, each called once on all
    of them; image ``i`` was generated for the dataset row ``rows[i]``, whose prompt and other columns the rewards
    receive."""
    prompts = [row[prompt_column] for row in rows]
    columns = {name: [row[name] for row in rows] for name in rows[0] if name != prompt_column}
    return torch.stack(
        [call_reward(name, fn, images, prompts, columns) for name, fn in zip(names, reward_fns, strict=True)], dim=-1
    )
