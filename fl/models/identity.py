"""Public identities for pretraining: an identity code computed from what SynthFaces
knows about each public person, not a free table.

Why: a free embedding table (one row per public identity) is learnt only at the
rows the batch touches, so with a few hundred identities the decoder sees a
scattered handful of codes, and a new user's embedding, fitted on the device,
lands between them where the decoder has never been taught to draw (measured:
off-colour blotches on the fitted new user). Here every public identity's code is
a shared MLP of its renderer parameters (face shape, skin, eyes, brows, nose,
mouth, lips, hair style and colour, glasses), so the codes form a smooth space and
every training step shapes all of it. The MLP exists only during pretraining;
devices still learn a free personal embedding in that space, starting from the
mean public code.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import torch
from torch import nn

from fl.data.synthfaces import Identity

HAIR_STYLES = 4


def identity_features(identity: Identity) -> np.ndarray:
    """The renderer's parameters of one person as numbers (hair style one-hot)."""
    values: list[float] = []
    for f in fields(Identity):
        value = getattr(identity, f.name)
        if f.name == "hair_style":
            values.extend(float(value == k) for k in range(HAIR_STYLES))
        elif isinstance(value, tuple):
            values.extend(value)
        else:
            values.append(float(value))
    return np.asarray(values, np.float32)


class PublicIdentities(nn.Module):
    """Index of a public identity -> identity code (an ``nn.Embedding`` look-alike)."""

    def __init__(self, identities: list[Identity], dim: int, hidden: int = 64) -> None:
        super().__init__()
        features = np.stack([identity_features(i) for i in identities])
        mean, std = features.mean(axis=0), features.std(axis=0) + 1e-3
        self.register_buffer("features", torch.from_numpy((features - mean) / std))
        self.num_embeddings = len(identities)
        self.mapper = nn.Sequential(nn.Linear(features.shape[1], hidden), nn.SiLU(),
                                    nn.Linear(hidden, dim))

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.mapper(self.features[index])

    @property
    def weight(self) -> torch.Tensor:
        """Every public identity's code, ``(num_embeddings, dim)``."""
        return self.mapper(self.features)
