"""Weight-free rewards for image editing, and the helpers that read a dataset's source images and edit regions.

An editing dataset carries, next to each prompt (the instruction), the image to edit in a column (``source_image``
by default). Rewards receive it as ``columns["source_image"]``: one entry per generated image, each a PIL image,
a path, a numpy array ``[H, W, 3]`` / ``[H, W]`` or a torch tensor ``[3, H, W]`` / ``[H, W]``.
:func:`source_image_tensor` turns one entry into the float image a reward compares with the edit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

SOURCE_FORMATS = (
    "a PIL image, a path to an image file, a numpy array or nested lists [H, W, 3] or [H, W] (integers in 0-255, "
    "or floats in [0, 1]), or a torch tensor [3, H, W] or [H, W] (integers in 0-255, or floats in [0, 1])"
)
"""What one source-image entry may be, quoted by the errors."""
REGION_FORMATS = (
    "a box (x0, y0, x1, y1) in fractions of the width and height, or a mask [H, W] (PIL image, path, numpy "
    "array, nested lists or torch tensor; bool, uint8 (255 = in), other integers 0/1, or floats in [0, 1]; 1 = the "
    "region to edit)"
)
"""What one edit region may be, quoted by the errors."""


def _float_pixels(values: torch.Tensor, where: str, integer_max: int) -> torch.Tensor:
    """Pixel values as float32 in [0, 1]: uint8 divided by 255, bool as 0/1, other integers (nested lists read as
    int64) checked to lie in [0, ``integer_max``] and divided by it, floats checked to lie in [0, 1]."""
    if values.dtype == torch.uint8:
        return values.float() / 255
    if values.dtype == torch.bool:
        return values.float()
    if not values.is_floating_point():
        if not bool(((values >= 0) & (values <= integer_max)).all()):
            raise ValueError(
                f"{where} has {values.dtype} values outside [0, {integer_max}]: use integers in [0, {integer_max}], "
                "uint8 (0-255) or floats in [0, 1]."
            )
        return values.float() / integer_max
    values = values.detach().float()
    if not bool(((values >= 0) & (values <= 1)).all()):  # NaN fails both comparisons
        raise ValueError(f"{where} has float values outside [0, 1] (or NaN): scale them to [0, 1].")
    return values


def _open_image(path: str | os.PathLike, mode: str, where: str) -> np.ndarray:
    """The image file at ``path``, converted to the PIL ``mode`` ("RGB" or "L"), as a uint8 array."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode))
    except (OSError, ValueError) as error:
        raise ValueError(f"{where}: cannot read the image file {os.fspath(path)!r} ({error}).") from error


def _nested_lists(entry: Sequence, where: str) -> np.ndarray:
    """Nested lists as an array, or a clear error when they are ragged."""
    try:
        return np.asarray(entry)
    except ValueError as error:
        raise ValueError(f"{where} is nested lists that do not form a rectangular array ({error}).") from error


def _numeric_tensor(array: np.ndarray, where: str) -> torch.Tensor:
    """A numpy array as a tensor (a copy: arrays from PIL are read-only), refusing non-numeric ones."""
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{where} is an array of {array.dtype} values: expected numbers.")
    return torch.from_numpy(np.array(array))


def _resized(image: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """``[C, H, W]`` resized to ``size`` (H, W) with antialiased bilinear filtering; unchanged when it already is."""
    if size is None or tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]


def source_image_tensor(entry, size: tuple[int, int] | None = None, where: str = "the source image") -> torch.Tensor:
    """One source-image entry as a float32 ``[3, H, W]`` CPU tensor in [0, 1], resized to ``size`` = (H, W).

    Accepted entries (:data:`SOURCE_FORMATS`): a PIL image (any mode, converted to RGB), a path (``str`` or
    ``os.PathLike``) to an image file, a numpy array or nested lists (as ``datasets`` stores arrays) in PIL's layout
    (``[H, W, 3]``, or ``[H, W]`` grayscale), or a torch tensor in torch's layout (``[3, H, W]``, or ``[H, W]``
    grayscale). Integer values (0-255) are divided by 255; float values must already lie in [0, 1]. A source of
    another size is stretched to ``size`` (antialiased bilinear); ``size=None`` keeps its own.

    Args:
        entry: the dataset value.
        size: the generated image's (height, width), or None.
        where: names the entry in errors, e.g. ``"column 'source_image', row 3"``.

    Raises:
        ValueError: an unreadable file, a wrong shape or dtype, float values outside [0, 1]; the message names
            ``where`` and says what is expected.
        TypeError: any other kind of value (None included).
    """
    from PIL import Image

    if isinstance(entry, str | os.PathLike):
        entry = _open_image(entry, "RGB", where)
    elif isinstance(entry, Image.Image):
        entry = np.asarray(entry.convert("RGB"))
    elif isinstance(entry, Sequence):  # nested lists, as datasets stores arrays and JSON carries them
        entry = _nested_lists(entry, where)
    if isinstance(entry, np.ndarray):
        if entry.ndim == 3 and entry.shape[-1] == 3:
            entry = _numeric_tensor(entry, where).permute(2, 0, 1)
        elif entry.ndim == 2:
            entry = _numeric_tensor(entry, where)
        else:
            raise ValueError(f"{where} is a numpy array of shape {entry.shape}: expected [H, W, 3] or [H, W].")
    if not isinstance(entry, torch.Tensor):
        raise TypeError(f"{where} is a {type(entry).__name__}: expected {SOURCE_FORMATS}.")
    if entry.dim() == 2:
        entry = entry.expand(3, *entry.shape)
    if entry.dim() != 3 or entry.shape[0] != 3:
        raise ValueError(f"{where} is a tensor of shape {tuple(entry.shape)}: expected [3, H, W] or [H, W].")
    return _resized(_float_pixels(entry.cpu(), where, integer_max=255), size)


def checked_region(entry, where: str = "the edit region") -> tuple[float, float, float, float] | torch.Tensor:
    """One edit region, checked: a box ``(x0, y0, x1, y1)`` of floats, or a float32 mask ``[H, W]`` in [0, 1].

    A box is four numbers with ``0 <= x0 < x1 <= 1`` and ``0 <= y0 < y1 <= 1``, in fractions of the image's width
    and height, so one box fits every resolution. A mask (:data:`REGION_FORMATS`) is a PIL image (converted to
    grayscale), a path to one, or a 2-D array, nested lists or tensor (``[1, H, W]`` and ``[H, W, 1]`` are squeezed);
    uint8 values are divided by 255 (PIL's masks), bool ones are 0/1, other integers must be 0 or 1, floats must lie
    in [0, 1]. 1 marks the region to edit; soft values weigh a pixel in both regions.

    Raises:
        ValueError / TypeError: naming ``where`` and the accepted formats.
    """
    from PIL import Image

    if isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 4 and not _nested(entry):
        return _checked_box(entry, where)
    if isinstance(entry, str | os.PathLike):
        entry = _open_image(entry, "L", where)
    elif isinstance(entry, Image.Image):
        entry = np.asarray(entry.convert("L"))
    elif isinstance(entry, Sequence):  # a mask that travelled as JSON (serve-reward): nested lists of numbers
        entry = _nested_lists(entry, where)
    if isinstance(entry, np.ndarray):
        entry = _numeric_tensor(entry, where)
    if not isinstance(entry, torch.Tensor):
        raise TypeError(f"{where} is a {type(entry).__name__}: expected {REGION_FORMATS}.")
    if entry.dim() == 1 and entry.numel() == 4:
        return _checked_box(entry.tolist(), where)
    if entry.dim() == 3 and 1 in (entry.shape[0], entry.shape[-1]):
        entry = entry.squeeze(0 if entry.shape[0] == 1 else -1)
    if entry.dim() != 2:
        raise ValueError(f"{where} has shape {tuple(entry.shape)}: expected {REGION_FORMATS}.")
    return _float_pixels(entry.cpu(), where, integer_max=1)


def _nested(entry: Sequence) -> bool:
    """Whether a sequence holds sequences (a mask as nested lists) rather than four numbers (a box)."""
    return any(
        isinstance(value, Sequence | np.ndarray | torch.Tensor) and not isinstance(value, str) for value in entry
    )


def _checked_box(box: Sequence, where: str) -> tuple[float, float, float, float]:
    """Four numbers checked to be a box ``(x0, y0, x1, y1)`` inside the unit square, with a positive area."""
    try:
        x0, y0, x1, y1 = (float(value) for value in box)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where} {box!r} is not four numbers (x0, y0, x1, y1).") from error
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(
            f"{where} {box!r} is not a box (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1: its "
            "coordinates are fractions of the image's width and height."
        )
    return x0, y0, x1, y1


def region_mask(region: tuple[float, float, float, float] | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A :func:`checked_region` as a float32 mask ``[H, W]`` of ``size``: a box selects the pixels whose centres
    lie inside it; a mask of another size is resized (antialiased bilinear, so its edges may turn soft)."""
    if isinstance(region, torch.Tensor):
        return _resized(region[None], size)[0]
    height, width = size
    x0, y0, x1, y1 = region
    columns = (torch.arange(width) + 0.5) / width
    rows = (torch.arange(height) + 0.5) / height
    inside_x = (columns >= x0) & (columns < x1)
    inside_y = (rows >= y0) & (rows < y1)
    return (inside_y[:, None] & inside_x[None, :]).float()


def pixel_distance(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]``: the mean absolute difference over the three channels, in [0, 1] for images in [0, 1]."""
    return (images - references).abs().mean(dim=1)


def region_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[B]``: the mean of ``values`` ``[B, H, W]`` weighted by ``weights`` ``[B, H, W]`` (each image's weights
    must not sum to 0)."""
    return (values * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2))


def edit_terms(
    edited: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, target: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of :class:`EditConsistencyReward`, each ``[B]`` in [0, 1], 1 = best.

    With ``d(a, b)`` the per-pixel mean absolute difference over channels (:func:`pixel_distance`) and ``m`` the
    edit mask::

        keep   = 1 - mean_{1 - m} d(edited, source)            how much of the source survives outside the region
        change = mean_{m} d(edited, source)                    target None: how much the region changed
        change = 1 - mean_{m} d(edited, target)                target an RGB colour: how close the region is to it

    where ``mean_w`` is the ``w``-weighted mean over pixels (:func:`region_mean`).

    Args:
        edited: ``[B, 3, H, W]`` in [0, 1].
        source: ``[B, 3, H, W]`` in [0, 1], the images before the edit.
        mask: ``[B, H, W]`` in [0, 1], 1 = the region to change; neither ``m`` nor ``1 - m`` may sum to 0.
        target: None or an RGB colour ``[3]`` in [0, 1].
    """
    keep = 1 - region_mean(pixel_distance(edited, source), 1 - mask)
    if target is None:
        change = region_mean(pixel_distance(edited, source), mask)
    else:
        change = 1 - region_mean(pixel_distance(edited, target.view(1, 3, 1, 1)), mask)
    return keep, change


class EditConsistencyReward:
    """Rewards edits that change the edit region and keep the rest of the source image. Weight-free.

    For each generated image, with ``keep`` and ``change`` the terms of :func:`edit_terms` (both in [0, 1])::

        score = (keep_weight * keep + change_weight * change) / (keep_weight + change_weight)

    Range [0, 1]; 1 is the perfect edit: the source unchanged outside the region, and inside it the ``target``
    colour exactly (``target`` given) or the source's complement ``1 - source`` (``target=None``, where "more
    different is better": reachable only where the source is black or white, so the maximum is a bound, not a
    goal). Returning the source unchanged scores ``keep_weight / (keep_weight + change_weight)`` with
    ``target=None``. The score is smooth (piecewise linear) in the pixels, so a tiny RL run can move it: with a
    ``target``, "paint the box red and leave the rest alone" is a task whose progress the score measures
    exactly. It does not read the prompt; it checks that an edit is local, not that it follows the instruction
    (:class:`~trl_flow_egrpo.rewards.VLMJudgeReward` with ``source_image_column`` asks a judge that).

    Inputs, per image: the source from the dataset column ``source_column`` (see :func:`source_image_tensor`;
    stretched to the generated image's size), and the edit region from the column ``region_column`` (a mask or a
    box, :func:`checked_region`). A row whose region is None, or a batch without that column, uses ``region``.

    Args:
        region: the default edit region (a box ``(x0, y0, x1, y1)`` in fractions of the width and height, or a
            mask), or None: every row must then give one.
        target: an RGB colour in [0, 1] the region should become, or None to reward any change.
        keep_weight: weight of the ``keep`` term (>= 0).
        change_weight: weight of the ``change`` term (>= 0; the two may not both be 0).
        source_column: the dataset column holding the source images.
        region_column: the dataset column holding the edit regions.

    Raises (when called):
        ValueError: a missing column (the message names it and how to provide it), a column with a wrong number
            of entries, a bad entry, or a region that selects no pixel or every pixel (then there is nothing
            to change, or nothing to keep: score such edits with another reward).
    """

    name = "edit_consistency"

    def __init__(
        self,
        region=None,
        *,
        target: Sequence[float] | None = None,
        keep_weight: float = 1.0,
        change_weight: float = 1.0,
        source_column: str = "source_image",
        region_column: str = "edit_mask",
    ):
        if not (keep_weight >= 0 and change_weight >= 0 and keep_weight + change_weight > 0):
            raise ValueError(
                f"keep_weight and change_weight must be >= 0 and not both 0, got {keep_weight!r} and {change_weight!r}."
            )
        if target is not None:
            if len(target) != 3 or not all(0.0 <= float(c) <= 1.0 for c in target):
                raise ValueError(f"EditConsistencyReward target must be three RGB values in [0, 1], got {target!r}.")
            target = torch.tensor([float(c) for c in target])
        self.region = None if region is None else checked_region(region, "EditConsistencyReward region")
        self.target, self.keep_weight, self.change_weight = target, float(keep_weight), float(change_weight)
        self.source_column, self.region_column = source_column, region_column

    def __repr__(self) -> str:
        target = None if self.target is None else tuple(self.target.tolist())
        return (
            f"EditConsistencyReward(target={target}, keep_weight={self.keep_weight}, "
            f"change_weight={self.change_weight}, source_column={self.source_column!r}, "
            f"region_column={self.region_column!r})"
        )

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **columns) -> torch.Tensor:
        """Score ``images`` ``[B, 3, H, W]`` in [0, 1]; returns float32 ``[B]`` on the images' device."""
        keep, change = self.terms(images, **columns)
        return (self.keep_weight * keep + self.change_weight * change) / (self.keep_weight + self.change_weight)

    def terms(self, images: torch.Tensor, **columns) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keep, change)``, each float32 ``[B]`` on the images' device: the two terms of the score, to log or
        inspect separately (:func:`edit_terms`)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"EditConsistencyReward expects images of shape [B, 3, H, W], got {tuple(images.shape)} (for "
                "videos, wrap it in FrameAverageReward)."
            )
        size, count = tuple(images.shape[-2:]), images.shape[0]
        sources = column_entries(
            columns, self.source_column, count, f"one source image per row: {SOURCE_FORMATS}", "source_column"
        )
        source = torch.stack(
            [
                source_image_tensor(entry, size, f"column {self.source_column!r}, row {row}")
                for row, entry in enumerate(sources)
            ]
        )
        masks = torch.stack([region_mask(region, size) for region in self._regions(columns, count)])
        empty = (masks.sum(dim=(1, 2)) <= 0) | ((1 - masks).sum(dim=(1, 2)) <= 0)
        if bool(empty.any()):
            row = int(empty.nonzero()[0])
            raise ValueError(
                f"The edit region of row {row} selects {'no' if masks[row].sum() <= 0 else 'every'} pixel of the "
                f"{size[1]} x {size[0]} image: EditConsistencyReward needs both a region to change and a region to "
                "keep. Fix the region, or score whole-image edits with another reward."
            )
        target = None if self.target is None else self.target.to(images.device)
        return edit_terms(images.detach().float(), source.to(images.device), masks.to(images.device), target)

    def _regions(self, columns: dict, count: int) -> list:
        """The checked region of each row: the row's own, else the default."""
        if self.region_column not in columns:
            if self.region is None:
                raise ValueError(
                    f"EditConsistencyReward reads the edit regions from the dataset column {self.region_column!r}, "
                    f"which this batch lacks (columns: {sorted(columns)}), and has no default region. Add a "
                    f"{self.region_column!r} column ({REGION_FORMATS}), pass region_column=<your column>, or "
                    "give one region for all rows with EditConsistencyReward(region=...)."
                )
            return [self.region] * count
        regions = []
        for row, entry in enumerate(
            column_entries(columns, self.region_column, count, REGION_FORMATS, "region_column")
        ):
            if entry is not None:
                regions.append(checked_region(entry, f"column {self.region_column!r}, row {row}"))
            elif self.region is not None:
                regions.append(self.region)
            else:
                raise ValueError(
                    f"Row {row} of column {self.region_column!r} has no edit region (None) and "
                    "EditConsistencyReward has no default: fill it in, or pass region=... ."
                )
        return regions


def column_entries(columns: dict, column: str, count: int, what: str, argument: str) -> Sequence:
    """``columns[column]``, checked to hold one entry per image.

    Args:
        columns: the dataset columns a reward received.
        column: the one to read.
        count: the number of images.
        what: what the column should hold, for the error.
        argument: the reward's argument that names the column, e.g. ``"source_column"``, for the error.

    Raises:
        ValueError: the column is missing (the message names it, the columns present, what it should hold and
            the argument that renames it), or it has another number of entries than the ``count`` images.
    """
    if column not in columns:
        raise ValueError(
            f"This reward reads the dataset column {column!r}, which this batch lacks (columns: {sorted(columns)}). "
            f"Add a {column!r} column to the dataset ({what}), or pass {argument}=<your column>."
        )
    entries = columns[column]
    if len(entries) != count:
        raise ValueError(f"Column {column!r} has {len(entries)} entries for {count} images: it needs one per image.")
    return entries
