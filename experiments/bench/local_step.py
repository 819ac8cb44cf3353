"""DP-SGD vs non-private local training throughput for the swap model.

One device, its real photos, the default recipe; time of one participation
(``local.epochs`` passes) with and without Opacus, one thread.
"""

from __future__ import annotations

import dataclasses

import torch

from clients.trainer import train_on_device
from experiments.bench.common import median_seconds
from fl.config import compose, fleet_spec, recipe, task_params
from fl.data.device_data import load_device_data
from fl.privacy.ledger import PhotoLedger
from fl.privacy.plan import privacy_plan
from fl.tasks import get_task


def run(repeats: int = 5, overrides: list[str] | None = None) -> list[dict]:
    torch.set_num_threads(1)
    cfg = compose(overrides)
    task, spec, base = get_task(task_params(cfg)), fleet_spec(cfg), recipe(cfg, privacy_plan(cfg).photo)
    photos = task.training_tensors(load_device_data(spec, 0))
    rows = []
    for label, rec in (("dp-sgd", dataclasses.replace(base, photo_dp=True)),
                       ("non-private", dataclasses.replace(base, photo_dp=False))):
        model = task.build_model(spec.image_size)
        steps = train_on_device(task, model, photos, rec, PhotoLedger()).steps
        seconds = median_seconds(
            lambda m=model, r=rec: train_on_device(task, m, photos, r, PhotoLedger()), repeats)
        rows.append({"mode": label, "image_size": spec.image_size, "steps": steps,
                     "steps_per_s": steps / seconds,
                     "photos_per_s": steps * base.batch_size / seconds})
    rows.append({"mode": "dp-sgd / non-private", "image_size": spec.image_size, "steps": 0,
                 "steps_per_s": rows[0]["steps_per_s"] / rows[1]["steps_per_s"],
                 "photos_per_s": float("nan")})
    return rows
