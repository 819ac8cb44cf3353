"""The face-swap task: put the user's face into a film clip, trained privately.

On a device the model learns by reconstructing the user's own photos through the
shared encoder/decoder with the user's personal identity embedding. Swap quality
is measured against SynthFaces' exact ground truth: the user's identity rendered
under each clip frame's attributes. Two baselines travel with every swap number,
because a model that does not beat them has done nothing: the clip frame
returned unchanged, and the user's mean photo.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fl.data.device_data import DeviceData
from fl.data.fleet import (
    FleetSpec,
    public_attributes,
    public_identity,
    swap_benchmark,
)
from fl.data.synthfaces import render
from fl.metrics import psnr, ssim
from fl.models.losses import generator_loss
from fl.models.swap import SwapModel
from fl.tasks.base import SampleColumn, Task, register_task

# Public identities [0, num_public) are for pretraining; the new-user check uses
# public identities after those, which the shared weights have never seen.


@register_task("swap")
class SwapTask(Task):
    primary_metric = "swap_psnr"
    #: Share of pretraining pairs whose frame shows another identity than the target.
    swap_share = 0.8

    def __init__(self, width: int = 32, id_dim: int = 32,
                 device_trains: list[str] | tuple[str, ...] = ("decoder",),
                 eval_clips: int = 2) -> None:
        self.width, self.personal_dim = int(width), int(id_dim)
        self.device_trains = tuple(f"{p}." for p in device_trains)
        self.eval_clips = int(eval_clips)

    def architecture(self) -> dict[str, int | str]:
        return {"name": self.name, "design": "unet-film", "width": self.width,
                "id_dim": self.personal_dim}

    def build_model(self, image_size: int) -> SwapModel:
        return SwapModel(image_size, self.width, self.personal_dim)

    def device_loss(self, model: nn.Module, photos: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(model(photos), photos)

    def pretrain_loss(self, model: SwapModel, identities: nn.Embedding, spec: FleetSpec,
                      rng: np.random.Generator, batch_size: int) -> torch.Tensor:
        """Mostly *supervised swap*, some reconstruction, on public identities.

        The renderer gives the exact ground truth of identity A under the
        attributes of a frame of identity B (same pose, expression, light and
        scene), so the model is taught to take structure from the frame's U-Net
        skips but identity only from the embedding: a decoder that copied B's
        face through the skips would be wrong on ``swap_share`` of the pairs.
        Only public identities take part.
        """
        n_public = identities.num_embeddings
        target = rng.integers(n_public, size=batch_size)
        source = np.where(rng.uniform(size=batch_size) < self.swap_share,
                          rng.integers(n_public, size=batch_size), target)
        attrs = [public_attributes(spec, int(s), int(i))
                 for s, i in zip(source, rng.integers(1_000_000, size=batch_size))]
        frames = render([public_identity(spec, int(s)) for s in source], attrs, spec.image_size)
        truth = render([public_identity(spec, int(t)) for t in target],
                       [a.replace(noise_sigma=0.0) for a in attrs], spec.image_size)
        pred = model.draw(torch.from_numpy(frames), identities(torch.from_numpy(target)))
        return generator_loss(pred, torch.from_numpy(truth), self.structure_weight)

    def pretrain_loss_on_photos(self, model: SwapModel, photos: torch.Tensor,
                                identity: torch.Tensor, conditions: torch.Tensor | None,
                                generator: torch.Generator) -> torch.Tensor:
        """Redraw each photo from its own scrambled frame (``fl.data.augment``: the
        bottleneck that makes the embedding carry the identity) with its identity."""
        from fl.data.augment import scramble  # pretraining only

        return F.mse_loss(model.draw(scramble(photos, generator), identity), photos)

    @torch.no_grad()
    def evaluate_device(self, model: nn.Module, data: DeviceData,
                        spec: FleetSpec) -> dict[str, float]:
        model.eval()
        heldout = torch.from_numpy(data.heldout)
        metrics = {"recon_psnr": psnr(model(heldout), heldout)}
        if data.identity is None:  # real photos: no ground truth of a swap exists
            return metrics
        frames, attrs = swap_benchmark(spec, self.eval_clips)
        truth = torch.from_numpy(render(data.identity,
                                        [a.replace(noise_sigma=0.0) for a in attrs],
                                        spec.image_size))
        frames_t = torch.from_numpy(frames)
        swapped = model(frames_t)
        mean_photo = torch.from_numpy(data.train.mean(axis=0, keepdims=True)).expand_as(truth)
        from fl.face_metrics import swap_face_metrics  # the attribute net: evaluation only

        return metrics | {
            "swap_psnr": psnr(swapped, truth),
            "swap_ssim": ssim(swapped, truth),
            "swap_psnr_baseline_clip": psnr(frames_t, truth),
            "swap_psnr_baseline_mean": psnr(mean_photo, truth),
        } | swap_face_metrics(swapped, truth, attrs, spec.seed)

    @staticmethod
    def _clip_frames(spec: FleetSpec, rows: int) -> tuple[torch.Tensor, tuple]:
        """The first ``rows`` benchmark clip frames and their attributes."""
        frames, attrs = swap_benchmark(spec, 1 + (rows - 1) // spec.clip_length)
        return torch.from_numpy(frames[:rows]), attrs[:rows]

    def model_input(self, identity, spec: FleetSpec, rows: int) -> torch.Tensor:
        return self._clip_frames(spec, rows)[0]

    @torch.no_grad()
    def sample_columns(self, model: nn.Module, identity, spec: FleetSpec,
                       rows: int) -> list[SampleColumn]:
        """One row per clip frame, spread over the evaluation clips (first to last
        frame of each), so the rows show the poses and expressions that the
        metrics judge."""
        model.eval()
        frames, attrs = swap_benchmark(spec, self.eval_clips)
        pick = np.linspace(0, len(attrs) - 1, min(rows, len(attrs))).round().astype(int)
        frames_t, picked = torch.from_numpy(frames[pick]), [attrs[i] for i in pick]
        truth = render(identity, [a.replace(noise_sigma=0.0) for a in picked], spec.image_size)
        labels = [f"frame {i}\nyaw {a.yaw:+.1f}\npitch {a.pitch:+.1f}\nsmile {a.smile:.1f}\n"
                  f"light {a.light_x:+.1f}" for i, a in zip(pick, picked)]
        return [SampleColumn("clip frame", labels=labels), SampleColumn("frame", frames_t),
                SampleColumn("swap", model(frames_t)),
                SampleColumn("ground truth", torch.from_numpy(truth))]
