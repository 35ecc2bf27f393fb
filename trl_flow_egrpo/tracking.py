"""What the trainer shows a person: tracker set-up, the per-iteration summary line, image grids (frame strips for
videos)."""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import torch

from .redaction import redact, redact_text

_TRACKER_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "trackio": "trackio",
    "comet_ml": "comet_ml",
    "mlflow": "mlflow",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
}


def available_trackers(log_with: str | None) -> list[str] | None:
    """``log_with`` as accelerate's list, or a clear error for a tracker whose package is missing (accelerate
    would only warn and silently log nowhere)."""
    if not log_with:
        return None
    names = [name.strip() for name in log_with.split(",") if name.strip()]
    for name in names:
        package = _TRACKER_PACKAGES.get(name)
        if package is not None and importlib.util.find_spec(package) is None:
            extra = f' (or pip install "trl-flow-egrpo[{name}]")' if name in ("wandb", "tensorboard") else ""
            raise ValueError(
                f"log_with names '{name}' but the {package} package is not installed: pip install "
                f"{package}{extra}, or drop it from log_with."
            )
    return names


def tracker_init_kwargs(run_name: str | None, output_dir: str) -> dict:
    """Per-tracker init arguments: the run is named ``run_name``, else after ``output_dir`` (with secret-looking
    text redacted, :func:`~trl_flow_egrpo.redaction.redact_text`: a URL's password, a Hub token)."""
    name = redact_text(run_name or os.path.basename(os.path.abspath(output_dir)))
    return {"wandb": {"name": name}, "trackio": {"name": name}}


def flat_config(config: dict) -> dict:
    """The trackers' init config (tensorboard's ``hparams.yml`` and event files, the wandb / trackio config):
    ``config`` with secrets redacted (:func:`~trl_flow_egrpo.redaction.redact`), then lists and None turned into
    strings, as tensorboard's hparams accept only scalars."""
    return {
        key: (str(value) if isinstance(value, (list, tuple)) or value is None else value)
        for key, value in redact(config).items()
    }


def summary_line(metrics: dict[str, float], max_steps: int) -> str:
    """One line per iteration for the console: reward, loss, on-policy check, cost and time."""
    seconds = metrics["time/sampling"] + metrics["time/rewards"] + metrics["time/update"]
    return (
        f"iteration {metrics['iteration']}/{max_steps} | reward {metrics['reward/weighted_mean']:.4f} "
        f"(std {metrics['reward/weighted_std']:.4f}) | loss {metrics['loss']:+.2e} | "
        f"on-policy max|r-1| {metrics['ratio/on_policy_max_abs_dev']:.1e} | "
        f"{metrics['trajectory_evaluations']} evals ({metrics['transformer_rows']} transformer rows) | {seconds:.2f}s"
    )


def grid_columns(count: int) -> int:
    """Columns of a grid for ``count`` images: the smallest divisor of ``count`` that is at least
    ``sqrt(count)`` (a full grid, no empty cell), unless that grid would be wider than ``max(4, 3 * rows)``
    columns (5, 7, 11 images...); then ``ceil(sqrt(count))`` columns with the last row partly empty."""
    columns = next(c for c in range(math.ceil(math.sqrt(count)), count + 1) if count % c == 0)
    return columns if columns <= max(4, 3 * (count // columns)) else math.ceil(math.sqrt(count))


def frame_strips(videos: torch.Tensor, max_frames: int = 8) -> torch.Tensor:
    """Videos ``[N, F, 3, H, W]`` -> ``[N, K, 3, H, W]``: ``K = min(F, max_frames)`` frames per video, evenly spaced
    from the first to the last (frame ``round(j (F - 1) / (K - 1))`` for ``j = 0..K-1``), in order."""
    count = videos.shape[1]
    shown = min(count, max_frames)
    return videos[:, torch.linspace(0, count - 1, shown).round().long()]


def image_grid(
    images: torch.Tensor, columns: int | None = None, background: float = 1.0, max_frames: int = 8
) -> np.ndarray:
    """``[N, 3, H, W]`` images in [0, 1] tiled into one ``[rows*H, columns*W, 3]`` uint8 array.

    Cells left over in the last row are filled with ``background`` (white), so they do not read as a black
    image. Videos ``[N, F, 3, H, W]`` become one row per video: a strip of :func:`frame_strips`' ``max_frames``
    frames, left to right in time.
    """
    if images.dim() == 5:
        images = frame_strips(images, max_frames)
        columns = images.shape[1]
        images = images.flatten(0, 1)
    count, _, height, width = images.shape
    columns = columns or grid_columns(count)
    rows = math.ceil(count / columns)
    grid = torch.full((3, rows * height, columns * width), float(background))
    for i, image in enumerate(images.float().cpu()):
        row, column = divmod(i, columns)
        grid[:, row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    return grid.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def log_image_grid(accelerator, images: torch.Tensor, path: str, step: int, tag: str = "eval/images") -> None:
    """Save the grid of ``images`` (or the frame strips of videos ``[N, F, 3, H, W]``) to ``path`` (PNG) and send
    it to every tracker that takes images."""
    from PIL import Image

    grid = image_grid(images)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(grid).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: grid[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: [grid]}, step=step)
