"""Sample image grids for MLflow, drawn on the server from public identities only.

A reviewer wants to *see* what the numbers mean. The grid shows a new public
user (a SynthFaces identity that no device holds and pretraining never saw),
whose personal part the server fits on the current shared weights exactly as
the new-user check does: input | output | ground truth, one row per sample.
No image of a device's user and no output of a device's personal weights is
ever drawn, because the server has neither.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fl.data.fleet import FleetSpec
from fl.tasks.base import SampleColumn, Task
from server.newuser import fit_new_user

SAMPLE_ROWS = 6
TILE = 96  # pixels per image in the grid (images are scaled up, nearest neighbour)
HEADER = 18


def draw_tile(column: SampleColumn, row: int) -> Image.Image:
    if column.images is not None:
        array = (column.images[row].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
        return Image.fromarray(array.astype(np.uint8)).resize((TILE, TILE), Image.NEAREST)
    tile = Image.new("RGB", (TILE, TILE), "white")
    ImageDraw.Draw(tile).multiline_text((6, 6), column.labels[row], fill="black",
                                        font=ImageFont.load_default())
    return tile


def grid_image(columns: list[SampleColumn]) -> Image.Image:
    """Columns side by side under their titles."""
    rows = len(columns[0].labels or columns[0].images)
    canvas = Image.new("RGB", (TILE * len(columns), HEADER + TILE * rows), "white")
    draw = ImageDraw.Draw(canvas)
    for c, column in enumerate(columns):
        draw.text((c * TILE + 4, 3), column.title, fill="black", font=ImageFont.load_default())
        for r in range(rows):
            canvas.paste(draw_tile(column, r), (c * TILE, HEADER + r * TILE))
    return canvas


def sample_grid(task: Task, shared: dict[str, torch.Tensor],
                personal_init: dict[str, torch.Tensor], spec: FleetSpec, steps: int,
                seed: int = 0, rows: int = SAMPLE_ROWS) -> Image.Image:
    model, data = fit_new_user(task, shared, personal_init, spec, 0, steps, seed)
    return grid_image(task.sample_columns(model, data.identity, spec, rows))
