"""Make docs/img/real_face_enrolled.png: what a real JPEG gives after enrollment.

    OMP_NUM_THREADS=1 .venv/bin/python docs/img/real_face.py [pretraining steps]

A small portrait model is pretrained on SynthFaces (the same code as
``experiments.pretrain``, fewer steps and a narrower network so it runs in a few
minutes on a CPU) and logged to a throw-away MLflow store as a run's model. One
of the real LFW faces scikit-image ships is written as a JPEG, enrolled with
``experiments.enroll`` and drawn at three requested controls with
``experiments.generate`` (its function, on the CPU). Columns: the JPEG, the face crop the model sees, the
portraits.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from skimage import data as skdata

from experiments.enroll import main as enroll
from experiments.generate import generate
from fl.config import compose, fleet_spec, task_params
from fl.data.faces import crop_face
from fl.pretrain import pretrain
from fl.tasks import get_task
from fl.tracking.mlflow_run import RunLogger

OUT = Path(__file__).resolve().parent / "real_face_enrolled.png"
REQUESTS = ["yaw=-0.6,smile=0.1", "yaw=0.0,smile=0.9", "yaw=0.6,smile=0.5"]
SCALE = 4


def main(steps: int) -> None:
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="fedface-real-face-"))
    os.chdir(tmp)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = compose(["task=portrait", "task.width=8", "task.hidden=32", "data.num_public=64",
                   f"tracking.uri={uri}",
                   "tracking.experiment_name=real-face-figure"])
    task, spec = get_task(task_params(cfg)), fleet_spec(cfg)
    checkpoint = pretrain(task, spec, steps, 16, 2e-3, 0,
                          lambda s, loss: s % 100 == 0 and print(f"step {s} loss {loss:.4f}"))
    run = RunLogger(cfg)
    run.log_shared_model(checkpoint["shared"], checkpoint["personal_init"], task_params(cfg),
                         spec, None)
    run.end()

    selfies = tmp / "selfies"
    selfies.mkdir()
    face = (skdata.lfw_subset()[0] * 255).astype(np.uint8)  # 25 x 25 grey, tightly cropped
    canvas = np.full((150, 120), 128, np.uint8)
    canvas[30:130, 10:110] = np.asarray(Image.fromarray(face).resize((100, 100)))
    Image.fromarray(canvas).save(selfies / "selfie.jpg", quality=95)
    state, out = tmp / "state", tmp / "portraits"
    assert enroll(["--photos", str(selfies), "--model", run.run_id, "--state-dir", str(state),
                   "--tracking-uri", uri]) == 0
    generate(argparse.Namespace(model=run.run_id, state_dir=str(state), storage_dir=None,
                                device="cpu", frames=None, clip=0, controls=REQUESTS,
                                backdrop_image=None, out=str(out), tracking_uri=uri))

    size = spec.image_size * SCALE
    crop = crop_face(selfies / "selfie.jpg", spec.image_size).image
    tiles = [Image.open(selfies / "selfie.jpg").convert("RGB").resize((size * 120 // 150, size)),
             Image.fromarray((crop.transpose(1, 2, 0) * 255).round().astype(np.uint8))]
    tiles += [Image.open(out / f"portrait-{i:03d}-generated.png") for i in range(len(REQUESTS))]
    labels = ["real JPEG", "face crop", *[r.replace(",", " ") for r in REQUESTS]]
    width = sum(size if i else tiles[0].width for i in range(len(tiles))) + 4 * len(tiles)
    figure = Image.new("RGB", (width, size + 18), "white")
    x = 0
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        if i:
            tile = tile.resize((size, size), Image.Resampling.NEAREST)
        figure.paste(tile, (x, 0))
        ImageDraw.Draw(figure).text((x + 2, size + 4), label, fill="black")
        x += tile.width + 4
    figure.save(OUT, optimize=True)
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 600)
