"""Sample image grids for MLflow, drawn on the server from public identities only.

A reviewer wants to *see* what the numbers mean. The grid shows a new public
user (a SynthFaces identity that no device holds and pretraining never saw),
whose personal part the server fits on the current shared weights exactly as
the new-user check does: one column per input, output and ground truth, one row
per clip frame (swap: spread over the evaluation clips) or per control changed
from a neutral portrait (portrait: smile, yaw, pitch, light). Images are scaled
up by nearest neighbour (at least ``MIN_SCALE`` times, tiles of at least
``MIN_TILE`` pixels), so that eyes, mouth and hair line are visible pixels rather
than a resampled blur. No image of a device's user and no output of a device's
personal weights is ever drawn, because the server has neither.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fl.data.fleet import FleetSpec
from fl.tasks.base import SampleColumn, Task
from server.newuser import fit_new_user

SAMPLE_ROWS = 8
MIN_SCALE = 4  # nearest-neighbour upscale factor, at least
MIN_TILE = 128  # pixels per tile, at least (32 px images are scaled 4x)
HEADER = 18


def tile_size(image_size: int) -> int:
    """Tile side in the grid: a whole multiple of the image size (nearest neighbour)."""
    scale = max(MIN_SCALE, -(-MIN_TILE // image_size))
    return image_size * scale


def _column_image_size(columns: list[SampleColumn]) -> int:
    sizes = {int(c.images.shape[-1]) for c in columns if c.images is not None}
    if len(sizes) != 1:
        raise ValueError(f"a sample grid needs images of one size, got {sorted(sizes)}")
    return sizes.pop()


def draw_tile(column: SampleColumn, row: int, tile: int) -> Image.Image:
    if column.images is not None:
        array = (column.images[row].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
        return Image.fromarray(array.astype(np.uint8)).resize((tile, tile), Image.NEAREST)
    image = Image.new("RGB", (tile, tile), "white")
    ImageDraw.Draw(image).multiline_text((6, 6), column.labels[row], fill="black",
                                         font=ImageFont.load_default(), spacing=4)
    return image


def grid_image(columns: list[SampleColumn]) -> Image.Image:
    """Columns side by side under their titles, images upscaled ``tile_size`` x."""
    rows = len(columns[0].labels or columns[0].images)
    tile = tile_size(_column_image_size(columns))
    canvas = Image.new("RGB", (tile * len(columns), HEADER + tile * rows), "white")
    draw = ImageDraw.Draw(canvas)
    for c, column in enumerate(columns):
        draw.text((c * tile + 4, 3), column.title, fill="black", font=ImageFont.load_default())
        for r in range(rows):
            canvas.paste(draw_tile(column, r, tile), (c * tile, HEADER + r * tile))
    return canvas


def sample_grid(task: Task, shared: dict[str, torch.Tensor],
                personal_init: dict[str, torch.Tensor], spec: FleetSpec, steps: int,
                seed: int = 0, rows: int = SAMPLE_ROWS) -> Image.Image:
    model, data = fit_new_user(task, shared, personal_init, spec, 0, steps, seed)
    return grid_image(task.sample_columns(model, data.identity, spec, rows))
