"""The synthetic world of the testbed: coloured shapes at named positions, their prompts and their images.

A scene holds one or two objects. An object is a colour (red, green, blue, yellow), a shape (circle,
square, triangle) and a position (top left, top right, bottom left, bottom right, centre), and no two
objects share a position. Its prompt names the objects in order::

    "a red circle top left"
    "a red circle top left and a blue square bottom right"

Images are drawn on a white background, each object jittered a little in position and size, with
anti-aliased edges (4x4 supersampling), so one prompt has many images: the distribution the flow model
learns and that E-GRPO's rollouts sample from.

The held-out split is over compositions: a seeded fraction of the unordered pairs of objects is held out,
and a held-out pair appears in no training prompt, in either order. Every single object (colour, shape and
position together) is in the training set, so the held-out prompts test composition, not new words.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass

import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
"""Object colours, RGB in [0, 1]; pure colours, at distance >= 1 from each other and from the background."""

BACKGROUND: tuple[float, float, float] = (1.0, 1.0, 1.0)
"""The plain white background."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

_NEAR, _FAR = 7 / 32, 25 / 32
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (_NEAR, _NEAR),
    "top right": (_FAR, _NEAR),
    "bottom left": (_NEAR, _FAR),
    "bottom right": (_FAR, _FAR),
    "centre": (0.5, 0.5),
}
"""Nominal object centres ``(x, y)`` as fractions of the image side (y grows downwards)."""

RADIUS_RANGE: tuple[float, float] = (3.5 / 32, 4.0 / 32)
"""Object radius (half its extent), drawn uniformly in this range, as a fraction of the image side."""

POSITION_JITTER: float = 1 / 32
"""Each object's centre is moved by up to this much (uniformly, in x and y) from its nominal position."""

WORDS: tuple[str, ...] = ("a", "and", *COLOURS, *SHAPES, "top", "bottom", "left", "right", "centre")
"""Every word of the grammar (the tokenizers make each one a single token)."""

_SUPERSAMPLING = 4


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: ``colour`` in :data:`COLOURS`, ``shape`` in :data:`SHAPES`, ``position`` in
    :data:`POSITIONS`."""

    colour: str
    shape: str
    position: str

    @property
    def phrase(self) -> str:
        """The object's words in a prompt: ``"a red circle top left"``."""
        return f"a {self.colour} {self.shape} {self.position}"


def all_objects() -> list[SceneObject]:
    """The 60 objects, in a fixed order (colour, then shape, then position)."""
    return [SceneObject(c, s, p) for c, s, p in itertools.product(COLOURS, SHAPES, POSITIONS)]


def scene_prompt(objects: tuple[SceneObject, ...]) -> str:
    """The prompt of a scene: the objects' phrases joined by ``" and "``."""
    return " and ".join(obj.phrase for obj in objects)


_OBJECT_PATTERN = f"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) ({'|'.join(POSITIONS)})"
_PROMPT_RE = re.compile(f"{_OBJECT_PATTERN}(?: and {_OBJECT_PATTERN})?")


def parse_prompt(prompt: str) -> tuple[SceneObject, ...]:
    """The objects a prompt describes; the inverse of :func:`scene_prompt`.

    Raises:
        ValueError: the prompt is not a testbed prompt (one or two ``"a <colour> <shape> <position>"`` joined by
            ``" and "``, at distinct positions).
    """
    match = _PROMPT_RE.fullmatch(prompt.strip().lower())
    if match is None:
        raise ValueError(
            f"{prompt!r} is not a testbed prompt: expected one or two 'a <colour> <shape> <position>' "
            f"joined by ' and ', with colours {list(COLOURS)}, shapes {list(SHAPES)} and positions "
            f"{list(POSITIONS)} (e.g. 'a red circle top left and a blue square bottom right')."
        )
    groups = [g for g in match.groups() if g is not None]
    objects = tuple(SceneObject(*groups[i : i + 3]) for i in range(0, len(groups), 3))
    if len({obj.position for obj in objects}) != len(objects):
        raise ValueError(
            f"{prompt!r} puts two objects at the same position; testbed scenes have one object per position."
        )
    return objects


def split_prompts(seed: int = 0, heldout_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """The training and held-out prompts.

    The 60 one-object prompts are all for training. Of the 1440 unordered pairs of objects at distinct
    positions, ``round(heldout_fraction * 1440)`` are held out (a seeded shuffle); each pair gives two prompts
    (both orders), all in the same split.

    Returns:
        ``(train_prompts, heldout_prompts)``: 60 + 2 * 1296 = 2652 and 2 * 144 = 288 prompts at the defaults,
        in a fixed order.
    """
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be strictly between 0 and 1.")
    objects = all_objects()
    pairs = [(a, b) for a, b in itertools.combinations(objects, 2) if a.position != b.position]
    shuffled = list(pairs)
    random.Random(seed).shuffle(shuffled)
    heldout = set(shuffled[: round(heldout_fraction * len(pairs))])

    def prompts_of(selected_pairs):
        return [scene_prompt(order) for pair in selected_pairs for order in (pair, pair[::-1])]

    train = [scene_prompt((obj,)) for obj in objects] + prompts_of(p for p in pairs if p not in heldout)
    return train, prompts_of(p for p in pairs if p in heldout)


def _shape_mask(shape: str, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Whether the offsets ``(dx, dy)`` from an object's centre, in units of its radius, lie inside the shape.

    circle: ``dx^2 + dy^2 <= 1``; square: ``max(|dx|, |dy|) <= 0.85`` (about the circle's area); triangle, apex
    up: ``-1 <= dy <= 0.8`` and ``|dx| <= (dy + 1) / 1.8`` (its base is as wide as the circle).
    """
    if shape == "circle":
        return dx**2 + dy**2 <= 1
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) <= 0.85
    if shape == "triangle":
        return (dy >= -1) & (dy <= 0.8) & (dx.abs() <= (dy + 1) / 1.8)
    raise ValueError(f"Unknown shape {shape!r}; the testbed's shapes are {list(SHAPES)}.")


def render_scene(objects: tuple[SceneObject, ...], size: int, generator: torch.Generator) -> torch.Tensor:
    """One image of a scene, ``[3, size, size]`` floats in [0, 1].

    Each object's centre is its nominal position plus a uniform jitter of up to :data:`POSITION_JITTER` in x
    and y, and its radius is uniform in :data:`RADIUS_RANGE` (three draws from ``generator`` per object, in
    order). Pixel values are the shape's coverage of the pixel (``4 x 4`` subsamples), blended over the
    background. Coverage is computed only in the object's bounding box (that is what keeps rendering fast).
    """
    image = torch.tensor(BACKGROUND)[:, None, None].repeat(1, size, size)
    for obj in objects:
        jitter_x, jitter_y, radius_draw = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        centre_x, centre_y = POSITIONS[obj.position]
        centre_x += (2 * jitter_x - 1) * POSITION_JITTER
        centre_y += (2 * jitter_y - 1) * POSITION_JITTER
        radius = RADIUS_RANGE[0] + radius_draw * (RADIUS_RANGE[1] - RADIUS_RANGE[0])
        x0, x1 = _pixel_span(centre_x, radius, size)
        y0, y1 = _pixel_span(centre_y, radius, size)
        dx = ((_subpixel_centres(x0, x1, size) - centre_x) / radius)[None, :]
        dy = ((_subpixel_centres(y0, y1, size) - centre_y) / radius)[:, None]
        inside = _shape_mask(obj.shape, dx, dy).float()
        coverage = torch.nn.functional.avg_pool2d(inside[None, None], _SUPERSAMPLING)[0]
        colour = torch.tensor(COLOURS[obj.colour])[:, None, None]
        window = image[:, y0:y1, x0:x1]
        image[:, y0:y1, x0:x1] = window * (1 - coverage) + colour * coverage
    return image


def _subpixel_centres(start: int, stop: int, size: int) -> torch.Tensor:
    """Centres of the subsamples of pixels ``[start, stop)`` along one axis, as fractions of the image side."""
    subsample_index = torch.arange(start * _SUPERSAMPLING, stop * _SUPERSAMPLING, dtype=torch.float64)
    return (subsample_index + 0.5) / (size * _SUPERSAMPLING)


def _pixel_span(centre: float, radius: float, size: int) -> tuple[int, int]:
    """The pixel range ``[start, stop)`` along one axis that an object of this centre and radius can touch."""
    return max(0, math.floor((centre - radius) * size)), min(size, math.ceil((centre + radius) * size))


def render_prompts(prompts: list[str], size: int, generator: torch.Generator) -> torch.Tensor:
    """Images of ``prompts`` (one each, drawn in order from ``generator``), ``[B, 3, size, size]`` in [0, 1]."""
    return torch.stack([render_scene(parse_prompt(prompt), size, generator) for prompt in prompts])
