"""SynthFaces throughput on one core (images/s), by batch size and image size."""

from __future__ import annotations

import torch

from experiments.bench.common import median_seconds
from fl.data.synthfaces import Attributes, Identity, render


def run(repeats: int = 7) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for size in (32, 64, 128):
        for batch in (1, 32, 256):
            attrs = [Attributes.sample(0, 1, k) for k in range(batch)]
            identities = [Identity.sample(0, k) for k in range(batch)]
            seconds = median_seconds(
                lambda i=identities, a=attrs, s=size: render(i, a, s), repeats)
            rows.append({"size": size, "batch": batch, "images_per_s": batch / seconds})
    return rows
