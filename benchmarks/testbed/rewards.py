"""Verifiable rewards of the testbed, computed from pixels: is each described colour where the prompt puts it,
and are there as many objects as the prompt describes.

Both read the image the same way. Each pixel is classified as the nearest of the palette (the white
background and the four object colours) when it lies within ``max_distance`` of it in RGB, and as
unclassified otherwise (anti-aliased edges, blurred or muddy colours). Both rewards are in [0, 1], exactly 1
for the ground-truth images of :mod:`.grammar`, deterministic, and take a few milliseconds per batch. Like
the compositional rewards the E-GRPO paper targets, they are decided by the early, high-noise sampling steps
that lay out the scene.

Both follow the library's reward protocol ``fn(images, prompts, **columns) -> [B]`` (``images``: float
``[B, 3, H, W]`` in [0, 1]; square images of any size, thresholds scale with the image area) and raise a clear
error for a prompt outside the testbed's grammar.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch

from .grammar import BACKGROUND, COLOURS, POSITIONS, parse_prompt

PALETTE: dict[str, tuple[float, float, float]] = {"background": BACKGROUND, **COLOURS}
"""What a pixel can be classified as, in label order: 0 is the background, 1.. the object colours."""

UNCLASSIFIED = -1
"""The label of a pixel farther than ``max_distance`` from every palette colour."""

REGION_HALF_SIZE: float = 4 / 32
"""Half the side of the square window around a position's nominal centre in which the composition reward
looks for the described colour (a fraction of the image side; the windows of the five positions do not
overlap, and an object jittered within :data:`~.grammar.POSITION_JITTER` keeps most of its pixels inside)."""


def classify_pixels(images: torch.Tensor, max_distance: float = 0.5) -> torch.Tensor:
    """Per-pixel palette labels ``[B, H, W]``: the index in :data:`PALETTE` of the nearest colour (Euclidean,
    RGB in [0, 1]) if it is within ``max_distance``, else :data:`UNCLASSIFIED`.

    With the default 0.5, a pixel blending an object colour ``c`` over white with coverage ``alpha`` counts as
    the colour for ``alpha > 0.65`` (``0.5`` for yellow), as background below ``0.35``, unclassified between.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] RGB floats in [0, 1], got shape {tuple(images.shape)}.")
    palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32, device=images.device)
    pixels = images.detach().float().permute(0, 2, 3, 1)
    squared_distances = ((pixels[..., None, :] - palette) ** 2).sum(dim=-1)
    nearest_squared_distance, labels = squared_distances.min(dim=-1)
    return torch.where(nearest_squared_distance <= max_distance**2, labels, torch.full_like(labels, UNCLASSIFIED))


@cache
def region_mask(position: str, size: int) -> torch.Tensor:
    """Boolean ``[size, size]`` mask of the window of ``position``: the pixels whose centres lie within
    :data:`REGION_HALF_SIZE` of the position's nominal centre (in x and y). Cached: do not modify it."""
    coords = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    centre_x, centre_y = POSITIONS[position]
    inside_x = (coords - centre_x).abs() <= REGION_HALF_SIZE + 1e-9
    inside_y = (coords - centre_y).abs() <= REGION_HALF_SIZE + 1e-9
    return inside_y[:, None] & inside_x[None, :]


def label_components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected components of boolean masks ``[N, H, W]``.

    Every pixel of the mask starts with its own flat index as label; each round replaces a pixel's label with
    the smallest among itself and its 4 neighbours in the mask, until nothing changes. A component ends up
    labelled with its smallest flat index. Pixels outside the mask get ``H * W``.
    """
    count, height, width = mask.shape
    outside = height * width
    flat_index = torch.arange(height * width, device=mask.device).view(1, height, width).expand(count, -1, -1)
    labels = torch.where(mask, flat_index, outside)
    while True:
        padded = torch.nn.functional.pad(labels, (1, 1, 1, 1), value=outside)
        neighbourhood_min = labels
        for neighbour in (padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]):
            neighbourhood_min = torch.minimum(neighbourhood_min, neighbour)
        updated = torch.where(mask, neighbourhood_min, outside)
        if torch.equal(updated, labels):
            return labels
        labels = updated


def count_objects(images: torch.Tensor, min_pixels_fraction: float = 6 / 1024, max_distance: float = 0.5) -> list[int]:
    """Objects per image: the 4-connected components of pixels of one object colour (components of different
    colours are different objects, even when they touch) with at least ``min_pixels_fraction`` of the image's
    pixels (smaller specks are ignored)."""
    labels = classify_pixels(images, max_distance)
    batch, height, width = labels.shape
    min_pixels = min_pixels_fraction * height * width
    per_colour = torch.stack([labels == index for index in range(1, len(PALETTE))], dim=1)
    components = label_components(per_colour.view(-1, height, width)).view(batch, -1)
    counts = []
    for image_components in components:
        _, sizes = torch.unique(image_components[image_components < height * width], return_counts=True)
        counts.append(int((sizes >= min_pixels).sum()))
    return counts


class _PixelReward:
    """What the palette-based rewards share: a pixel-count threshold as a fraction of the image (so that it
    scales with the image size), the colour classification threshold, and the checks of a batch.

    Args:
        min_pixels_fraction: pixels (as a fraction of the image) that make the reward's unit (an object present,
            an object counted); the subclass's :attr:`default_min_pixels_fraction` when None.
        max_distance: colour classification threshold (:func:`classify_pixels`).
    """

    name: str
    default_min_pixels_fraction: float

    def __init__(self, min_pixels_fraction: float | None = None, max_distance: float = 0.5):
        if min_pixels_fraction is None:
            min_pixels_fraction = self.default_min_pixels_fraction
        if not 0 < min_pixels_fraction < 1:
            raise ValueError(f"min_pixels_fraction={min_pixels_fraction} must be in (0, 1).")
        self.min_pixels_fraction = min_pixels_fraction
        self.max_distance = max_distance

    def min_pixels(self, images: torch.Tensor) -> float:
        """The threshold in pixels for these (square) images."""
        return self.min_pixels_fraction * images.shape[-1] * images.shape[-2]


class CompositionReward(_PixelReward):
    """The fraction of the described objects whose colour is present in their position's window.

    Per object, the score is ``min(1, n / (min_pixels_fraction * H * W))`` with ``n`` the pixels of the
    object's colour in the window of its position (:func:`region_mask`): 1 once at least ``min_pixels_fraction``
    of the image shows the colour there (10 pixels at 32x32; in one render of every prompt, the smallest
    ground-truth object shows 16), partial credit below, so that rollouts that get closer are ranked higher. The
    reward is the mean over the prompt's objects, in [0, 1]. Shape is not checked, and colour elsewhere is not
    penalized: pair it with :class:`CountReward` (as a training or an evaluation reward) to see extra objects.
    Arguments: :class:`_PixelReward` (default ``min_pixels_fraction``: 12 / 1024).
    """

    name = "composition"
    default_min_pixels_fraction = 10 / 1024

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **columns) -> torch.Tensor:
        _check_batch(images, prompts)
        labels = classify_pixels(images, self.max_distance)
        size = labels.shape[-1]
        min_pixels = self.min_pixels(images)
        colour_labels = {name: index for index, name in enumerate(PALETTE)}
        rewards = []
        for image_labels, prompt in zip(labels, prompts, strict=True):
            objects = parse_prompt(prompt)
            scores = [
                min(
                    1.0,
                    int(
                        (
                            image_labels[region_mask(obj.position, size).to(labels.device)] == colour_labels[obj.colour]
                        ).sum()
                    )
                    / min_pixels,
                )
                for obj in objects
            ]
            rewards.append(sum(scores) / len(scores))
        return torch.tensor(rewards)


class CountReward(_PixelReward):
    """How well the number of objects in the image matches the number the prompt describes.

    ``max(0, 1 - |counted - described| / described)`` with objects counted by :func:`count_objects`: 1 for the
    right count, 0 for an empty image; for a two-object prompt, 0.5 for one or three objects. Arguments:
    :class:`_PixelReward` (``min_pixels_fraction``: the smallest component that counts as an object, default
    6 / 1024, 6 pixels at 32x32; in one render of every prompt, the smallest ground-truth object is 16).
    """

    name = "count"
    default_min_pixels_fraction = 6 / 1024

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **columns) -> torch.Tensor:
        _check_batch(images, prompts)
        counted = count_objects(images, self.min_pixels_fraction, self.max_distance)
        described = [len(parse_prompt(prompt)) for prompt in prompts]
        return torch.tensor([max(0.0, 1 - abs(c - d) / d) for c, d in zip(counted, described, strict=True)])


class ColourPurityReward(_PixelReward):
    """How pure the described colour is where the prompt puts each object: a dense, graded reward.

    For an object of colour ``c`` at a position, each pixel ``p`` of the position's window (:func:`region_mask`)
    has the closeness ``max(0, 1 - ||p - c||)`` (RGB in [0, 1]; the palette colours are at distance >= 1 from
    each other and from the white background, so those score 0). The object's score is the mean closeness of
    the ``k = round(min_pixels_fraction * H * W)`` closest pixels of the window (12 at 32x32); the reward is the
    mean over the prompt's objects, in [0, 1]. Ground-truth renders score 1, except for about 2% (small
    triangles, whose 12th-best pixel is anti-aliased) that score at least 0.99.

    Unlike :class:`CompositionReward`, which saturates once 10 pixels are classified as the colour, every
    change of hue or saturation moves it, so the rollouts of a group almost never tie: a muddy, orange-ish or
    half-transparent object scores less than a pure one. The pretrained testbed scores about 0.7 on the held-out
    prompts, ground truth 1. ``max_distance`` is unused (no classification); colour elsewhere is not penalized.
    Arguments: :class:`_PixelReward` (default ``min_pixels_fraction``: 12 / 1024).
    """

    name = "purity"
    default_min_pixels_fraction = 12 / 1024

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **columns) -> torch.Tensor:
        _check_batch(images, prompts)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] RGB floats in [0, 1], got shape {tuple(images.shape)}.")
        pixels = images.detach().float()
        size = pixels.shape[-1]
        k = max(1, round(self.min_pixels(pixels)))
        rewards = []
        for image, prompt in zip(pixels, prompts, strict=True):
            objects = parse_prompt(prompt)
            scores = []
            for obj in objects:
                window = image[:, region_mask(obj.position, size).to(image.device)]  # [3, pixels]
                colour = torch.tensor(COLOURS[obj.colour], device=image.device)[:, None]
                closeness = (1 - (window - colour).norm(dim=0)).clamp(min=0)
                scores.append(closeness.topk(min(k, closeness.numel())).values.mean())
            rewards.append(torch.stack(scores).mean())
        return torch.stack(rewards).cpu()


def _check_batch(images: torch.Tensor, prompts: Sequence[str]) -> None:
    """One prompt per image, square images."""
    if len(prompts) != len(images):
        raise ValueError(f"Got {len(images)} images for {len(prompts)} prompts: pass one prompt per image.")
    if images.ndim == 4 and images.shape[-1] != images.shape[-2]:
        raise ValueError(f"The testbed rewards expect square images, got {images.shape[-2]}x{images.shape[-1]}.")
