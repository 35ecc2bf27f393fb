"""Write this repository's small image-editing set: ``edit_sources/*.png`` (simple scenes of one shape on a
background), ``edit_train.jsonl`` and ``edit_test.jsonl`` (one row per edit: ``prompt``, the instruction;
``source_image``, the path of the image to edit, relative to the repository root; ``edit_mask``, the box
``[x0, y0, x1, y1]`` in fractions of the width and height where the edit should happen).

    python examples/prompts/make_edit_prompts.py

The scenes and instructions are generated here with a fixed seed, so running the script rewrites the same files.
Every instruction recolours the scene's one shape, so the box around the shape is the region ``EditConsistencyReward``
(``edit_consistency``) rewards changing while it rewards keeping the rest; the test instructions ask for colour and
shape pairs that no training row asks for.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random

from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = os.path.join(HERE, "edit_sources")
SIZE = 512
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
BACKGROUNDS = ((245, 240, 230), (210, 225, 240), (230, 230, 230), (40, 45, 60))
TEMPLATES = ("make the {shape} {colour}", "paint the {shape} {colour}", "change the colour of the {shape} to {colour}")


def star_points(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """The ten corners of a five-pointed star centred at ``(cx, cy)``."""
    return [
        (
            cx + (radius if i % 2 == 0 else radius / 2.5) * math.sin(i * math.pi / 5),
            cy - (radius if i % 2 == 0 else radius / 2.5) * math.cos(i * math.pi / 5),
        )
        for i in range(10)
    ]


def draw_scene(shape: str, colour: tuple[int, int, int], background, box: tuple[int, int, int, int]) -> Image.Image:
    """One shape of ``colour`` filling ``box`` (pixels) on a plain ``background``."""
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:
        draw.polygon(star_points((x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2), fill=colour)
    return image


def main() -> None:
    """Write the sources and the two JSONL files."""
    rng = random.Random(0)
    os.makedirs(SOURCES, exist_ok=True)
    pairs = list(itertools.product(SHAPES, COLOURS))  # (shape, target colour) of each edit
    rng.shuffle(pairs)
    splits = {"test": pairs[:6], "train": pairs[6:]}
    for split, split_pairs in splits.items():
        rows = []
        for index, (shape, target) in enumerate(split_pairs):
            start = rng.choice([name for name in COLOURS if name != target])
            side = rng.randrange(SIZE // 4, SIZE // 2)
            x0, y0 = rng.randrange(16, SIZE - side - 16), rng.randrange(16, SIZE - side - 16)
            box = (x0, y0, x0 + side, y0 + side)
            name = f"{split}_{index:02d}_{start}_{shape}.png"
            draw_scene(shape, COLOURS[start], rng.choice(BACKGROUNDS), box).save(os.path.join(SOURCES, name))
            rows.append(
                {
                    "prompt": rng.choice(TEMPLATES).format(shape=shape, colour=target),
                    "source_image": f"examples/prompts/edit_sources/{name}",
                    "edit_mask": [round(value / SIZE, 4) for value in box],
                }
            )
        with open(os.path.join(HERE, f"edit_{split}.jsonl"), "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
