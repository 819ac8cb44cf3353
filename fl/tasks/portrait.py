"""The portrait task: studio portraits of the user, from ~20 selfies, privately.

A device learns its personal identity embedding (and optional adapter) by
redrawing its own photos from their controls and backdrop; the shared generator
is fine-tuned under the same photo- and user-level privacy as every task.

Quality on SynthFaces is measured against the exact ground truth: the user's
identity rendered at a fixed **studio panel** of control combinations that no
photo was taken at (3 yaws x 2 smiles x 2 light directions, studio backdrop, no
sensor noise). The user's mean photo is the baseline a generator must beat. On
any source, ``portrait_heldout_psnr`` redraws the held-out photos at their own
controls and backdrop.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fl.data.controls import STUDIO_BACKDROP, backdrop, conditions, from_attributes
from fl.data.device_data import DeviceData
from fl.data.fleet import FleetSpec, public_attributes, public_identity
from fl.data.synthfaces import Attributes, Identity, render
from fl.metrics import psnr, ssim
from fl.models.losses import generator_loss
from fl.models.portrait import PortraitModel
from fl.tasks.base import SampleColumn, Task, register_task


@lru_cache(maxsize=1)
def studio_panel() -> tuple[Attributes, ...]:
    """The requested portraits every device is evaluated on."""
    return tuple(
        Attributes(yaw=yaw, pitch=0.0, smile=smile, light_x=light_x, light_y=-0.3,
                   light_intensity=1.0, background=STUDIO_BACKDROP, background_gradient=0.0,
                   noise_sigma=0.0, noise_seed=0)
        for yaw, smile, light_x in itertools.product((-0.6, 0.0, 0.6), (0.1, 0.9), (-0.5, 0.5)))


def control_sweep() -> tuple[tuple[str, Attributes], ...]:
    """The sample grid's rows: a neutral studio portrait, then one control changed."""
    neutral = Attributes(yaw=0.0, pitch=0.0, smile=0.1, light_x=0.0, light_y=-0.3,
                         light_intensity=1.0, background=STUDIO_BACKDROP,
                         background_gradient=0.0, noise_sigma=0.0, noise_seed=0)
    changes = (("neutral", {}), ("smile", {"smile": 0.95}), ("yaw left", {"yaw": -0.8}),
               ("yaw right", {"yaw": 0.8}), ("pitch up", {"pitch": -0.8}),
               ("pitch down", {"pitch": 0.8}), ("light left", {"light_x": -0.9}),
               ("light right", {"light_x": 0.9}))
    return tuple((name, neutral.replace(**change)) for name, change in changes)


def render_conditions(images: np.ndarray, attrs) -> torch.Tensor:
    """Conditions of rendered images: exact controls, backdrop measured from the image."""
    return torch.from_numpy(conditions(from_attributes(attrs), backdrop(images)))


def studio_truth(identity: Identity, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditions, ground-truth images) of the studio panel for ``identity``."""
    attrs = studio_panel()
    truth = render(identity, list(attrs), size)
    return render_conditions(truth, attrs), torch.from_numpy(truth)


@register_task("portrait")
class PortraitTask(Task):
    primary_metric = "portrait_psnr"
    needs_controls = True

    def __init__(self, width: int = 32, code_dim: int = 32, id_dim: int = 32,
                 hidden: int = 64, adapter: bool = False,
                 device_trains: list[str] | tuple[str, ...] = ("decoder",)) -> None:
        self.width, self.code_dim, self.personal_dim = int(width), int(code_dim), int(id_dim)
        self.hidden, self.adapter = int(hidden), bool(adapter)
        self.device_trains = tuple(f"{p}." for p in device_trains)

    def architecture(self) -> dict[str, int | str]:
        # Not the adapter: it is personal, untouched by pretraining, and starts at
        # the identity (runs fill it in), so one pretraining serves both settings.
        return {"name": self.name, "design": "control-field-unet", "width": self.width,
                "code_dim": self.code_dim,
                "id_dim": self.personal_dim, "hidden": self.hidden}

    def build_model(self, image_size: int) -> PortraitModel:
        return PortraitModel(image_size, self.width, self.code_dim, self.personal_dim,
                             self.hidden, self.adapter)

    def training_tensors(self, data: DeviceData) -> tuple[torch.Tensor, ...]:
        if data.train_controls is None:
            raise ValueError("the portrait task needs controls for every photo; this data "
                             "source has none (folders: set data.controls_csv)")
        return (torch.from_numpy(data.train),
                torch.from_numpy(conditions(data.train_controls, backdrop(data.train))))

    def device_loss(self, model: nn.Module, photos: torch.Tensor,
                    conds: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(model(conds), photos)

    def pretrain_loss(self, model: PortraitModel, identities: nn.Embedding, spec: FleetSpec,
                      rng: np.random.Generator, batch_size: int) -> torch.Tensor:
        """Redraw noiseless renders of public identities from their conditions."""
        target = rng.integers(identities.num_embeddings, size=batch_size)
        attrs = [public_attributes(spec, int(t), int(i)).replace(noise_sigma=0.0)
                 for t, i in zip(target, rng.integers(1_000_000, size=batch_size))]
        truth = render([public_identity(spec, int(t)) for t in target], attrs, spec.image_size)
        pred = model.draw(render_conditions(truth, attrs), identities(torch.from_numpy(target)))
        return generator_loss(pred, torch.from_numpy(truth), self.structure_weight)

    def pretrain_loss_on_photos(self, model: PortraitModel, photos: torch.Tensor,
                                identity: torch.Tensor, conditions: torch.Tensor | None,
                                generator: torch.Generator) -> torch.Tensor:
        """Redraw each photo from its conditions (labelled, or fitted per photo:
        ``fl.latent_controls``) with its identity's embedding."""
        return F.mse_loss(model.draw(conditions, identity), photos)

    @torch.no_grad()
    def evaluate_device(self, model: nn.Module, data: DeviceData,
                        spec: FleetSpec) -> dict[str, float]:
        model.eval()
        metrics = {}
        if data.heldout_controls is not None and len(data.heldout):
            heldout = torch.from_numpy(data.heldout)
            conds = torch.from_numpy(conditions(data.heldout_controls, backdrop(data.heldout)))
            metrics["portrait_heldout_psnr"] = psnr(model(conds), heldout)
        if data.identity is not None:
            conds, truth = studio_truth(data.identity, spec.image_size)
            portraits = model(conds)
            mean_photo = torch.from_numpy(data.train.mean(axis=0, keepdims=True)).expand_as(truth)
            from fl.face_metrics import portrait_face_metrics  # evaluation only

            metrics |= {"portrait_psnr": psnr(portraits, truth),
                        "portrait_ssim": ssim(portraits, truth),
                        "portrait_psnr_baseline_mean": psnr(mean_photo, truth)}
            metrics |= portrait_face_metrics(portraits, truth, studio_panel(), spec.seed)
        return metrics

    def model_input(self, identity, spec: FleetSpec, rows: int) -> torch.Tensor:
        return studio_truth(identity, spec.image_size)[0][:rows]

    @torch.no_grad()
    def sample_columns(self, model: nn.Module, identity, spec: FleetSpec,
                       rows: int) -> list[SampleColumn]:
        """One row per control: a neutral studio portrait, then one control changed
        at a time (``control_sweep``), so a smile or a turn shows as a difference
        between rows."""
        model.eval()
        sweep = control_sweep()[:rows]
        attrs = [a for _, a in sweep]
        truth = render(identity, attrs, spec.image_size)
        labels = [f"{name}\nyaw {a.yaw:+.1f}\npitch {a.pitch:+.1f}\nsmile {a.smile:.1f}\n"
                  f"light {a.light_x:+.1f}" for name, a in sweep]
        return [SampleColumn("requested controls", labels=labels),
                SampleColumn("portrait", model(render_conditions(truth, attrs))),
                SampleColumn("ground truth", torch.from_numpy(truth))]
