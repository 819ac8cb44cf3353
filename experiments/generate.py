"""Generate images with a logged shared model and one device's personal part.

    # swap: put device 3's face into real frames (any image files) or a SynthFaces clip
    python -m experiments.generate --model <run id | runs:/.. | models:/..> --device 3 \\
        --frames frame1.jpg frame2.png --out generated/
    python -m experiments.generate --model <run id> --device 3 --clip 1 --out generated/
    # portrait: device 3 at requested controls (backdrop colour from a photo, optional)
    python -m experiments.generate --model <run id> --device 3 \\
        --controls "yaw=0.4,smile=0.9,light_x=-0.5" --backdrop-image bg.jpg --out generated/

This runs where the personal part is: on the user's device (``--state-dir``, the
SuperNode's state directory) or, for a simulated fleet, on the researcher's
machine that holds the devices' storage (``--device`` looks in
``devices.storage_dir/device-NNNNN/state/<run id>``). The shared weights and
the run's configuration come from MLflow; nothing personal goes back to it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from clients.device_state import DeviceStore
from fl import config as C
from fl.data.controls import CONTROL_NAMES, STUDIO_BACKDROP, backdrop, check_controls, conditions
from fl.data.fleet import swap_benchmark
from fl.data.images import UnusablePhoto, read_face
from fl.device import DeviceUnavailable, place, resolve
from fl.pretrain import load_checkpoint
from fl.tasks import get_task
from fl.tracking.mlflow_run import CONFIG_ARTIFACT, quiet_mlflow

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class GenerateError(ValueError):
    pass


@dataclass
class Inputs:
    names: list[str]
    tensor: torch.Tensor  # what the model's forward pass takes


def source_run(model: str) -> str:
    """The MLflow run that produced ``model`` (a run id, runs:/ or models:/ URI)."""
    if RUN_ID.match(model):
        return model
    if model.startswith("runs:/"):
        return model[len("runs:/"):].split("/")[0]
    if model.startswith("models:/"):
        try:
            return mlflow.models.get_model_info(model).run_id
        except Exception as err:  # noqa: BLE001 - MLflow raises many types for a bad URI
            raise GenerateError(f"--model {model}: {str(err).splitlines()[0]}") from None
    raise GenerateError(f"--model {model!r}: give a run id, runs:/<run id>/... or "
                        "models:/<name>/<version>")


def load_run(run_id: str, uri: str):
    """(config, shared checkpoint) of a finished fedface run."""
    try:
        config = mlflow.artifacts.load_text(f"runs:/{run_id}/{CONFIG_ARTIFACT}")
        shared = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model/shared.pt",
                                                     tracking_uri=uri)
    except Exception as err:  # noqa: BLE001
        raise GenerateError(f"run {run_id} at {uri} has no fedface model "
                            f"({str(err).splitlines()[0]}); did it finish?") from None
    return OmegaConf.create(config), load_checkpoint(shared)


def parse_controls(text: str) -> np.ndarray:
    """``yaw=0.4,smile=0.9`` -> a controls row (unnamed controls: 0, smile 0.5)."""
    values = {"yaw": 0.0, "pitch": 0.0, "smile": 0.5, "light_x": 0.0, "light_y": -0.3}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in values:
            raise GenerateError(f"--controls {text!r}: unknown control {name.strip()!r}; "
                                f"use {', '.join(CONTROL_NAMES)}")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise GenerateError(f"--controls {text!r}: {name.strip()} must be a number") from None
    return check_controls(np.array([[values[n] for n in CONTROL_NAMES]]), "--controls")


def read_images(paths: list[str], size: int) -> np.ndarray:
    images = []
    for path in paths:
        try:
            images.append(read_face(path, size)[0])
        except (UnusablePhoto, FileNotFoundError) as err:
            raise GenerateError(f"{path}: {err}") from None
    return np.stack(images)


def output_names(paths: list[str]) -> list[str]:
    """One distinct output name per input file: its stem, unless two inputs share
    it (``a.jpg`` and ``a.png``: then ``a-jpg``, ``a-png``; the same name in two
    folders: a number is added), so no output overwrites another."""
    stems = [Path(p).stem for p in paths]
    suffixes = [Path(p).suffix.lstrip(".") for p in paths]
    names = [f"{stem}-{suffix}" if stems.count(stem) > 1 and suffix else stem
             for stem, suffix in zip(stems, suffixes)]
    taken = {name for name in names if names.count(name) == 1}
    unique = []
    for name in names:
        if names.count(name) > 1:
            number = 1
            while f"{name}-{number}" in taken:
                number += 1
            name = f"{name}-{number}"
            taken.add(name)
        unique.append(name)
    return unique


def task_inputs(args: argparse.Namespace, task_name: str, spec) -> Inputs:
    if task_name == "swap":
        if args.frames:
            return Inputs(output_names(args.frames),
                          torch.from_numpy(read_images(args.frames, spec.image_size)))
        if args.clip:
            frames, _ = swap_benchmark(spec, args.clip)
            return Inputs([f"clip-frame-{i:03d}" for i in range(len(frames))],
                          torch.from_numpy(frames))
        raise GenerateError("a swap needs --frames <image files> or --clip <number of clips>")
    if not args.controls:
        raise GenerateError("a portrait needs --controls 'yaw=..,smile=..' (one per image)")
    colour = np.array([STUDIO_BACKDROP], np.float32)
    if args.backdrop_image:
        colour = backdrop(read_images([args.backdrop_image], spec.image_size))
    controls = np.concatenate([parse_controls(c) for c in args.controls])
    conds = conditions(controls, np.repeat(colour, len(controls), axis=0))
    return Inputs([f"portrait-{i:03d}" for i in range(len(controls))], torch.from_numpy(conds))


def personal_state(args: argparse.Namespace, cfg, run_id: str) -> dict[str, torch.Tensor]:
    """The device's personal weights of the run ``--model`` names: a real
    device's state directory holds every run's (its newest two generations), and
    another run's personal part does not belong with this run's shared model."""
    if args.state_dir:
        root = Path(args.state_dir)
    else:
        root = Path(args.storage_dir or cfg.devices.storage_dir) / \
            f"device-{args.device:05d}" / "state" / run_id
    store = DeviceStore(root, run_id)
    personal = store.personal_of_run(run_id)
    others = [run for run in store.runs() if run != run_id]
    if personal is None and others:
        raise GenerateError(
            f"{root} holds no personal weights of run {run_id}, only of "
            f"{', '.join(others)} (a state directory keeps its newest two generations): "
            "give --model the shared model of one of those runs")
    if personal is None:
        raise GenerateError(
            f"no personal weights in {root}: the device never trained in run {run_id}, "
            "or its user deleted their data. Give --state-dir of the device, or --device "
            "with the devices.storage_dir the run used (--storage-dir)")
    return personal


def save_images(images: torch.Tensor, names: list[str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, name in zip(images, names):
        array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        path = out / f"{name}-generated.png"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def generate(args: argparse.Namespace) -> list[Path]:
    quiet_mlflow()
    mlflow.set_tracking_uri(args.tracking_uri)
    run_id = source_run(args.model)
    cfg, checkpoint = load_run(run_id, args.tracking_uri)
    task, spec = get_task(C.task_params(cfg)), C.fleet_spec(cfg)
    inputs = task_inputs(args, task.name, spec)
    model = task.build_model(spec.image_size)
    model.load_state_dict({**checkpoint["shared"], **checkpoint["personal_init"]}, strict=False)
    model.load_state_dict({k: v for k, v in personal_state(args, cfg, run_id).items()
                           if task.is_personal(k)}, strict=False)
    try:
        place(resolve(args.compute_device), model)
    except DeviceUnavailable as err:
        raise GenerateError(f"--compute-device: {err}") from None
    model.eval()
    with torch.no_grad():
        images = model(inputs.tensor)
    return save_images(images, inputs.names, Path(args.out))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.generate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="run id, runs:/<run id>/..., models:/name/v")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", type=int, help="simulated device index (its storage dir)")
    who.add_argument("--state-dir", help="a real device's state directory")
    p.add_argument("--storage-dir", help="devices.storage_dir of the run (default: the run's)")
    p.add_argument("--frames", nargs="+", help="swap: image files to put the face into")
    p.add_argument("--clip", type=int, default=0, help="swap: this many SynthFaces clips")
    p.add_argument("--controls", action="append", help="portrait: 'yaw=..,smile=..' (repeat)")
    p.add_argument("--backdrop-image", help="portrait: take the backdrop colour from a photo")
    p.add_argument("--out", default="generated", help="output folder (default generated/)")
    # Not --device: that is the simulated device's index (argparse refuses both).
    p.add_argument("--compute-device", default="auto",
                   help="auto (CUDA when available) | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--tracking-uri",
                   default=os.environ.get("MLFLOW_TRACKING_URI", C.DEFAULT_TRACKING_URI))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        paths = generate(args)
    except GenerateError as err:
        print(f"fedface generate: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} images to {args.out}: " + ", ".join(p.name for p in paths[:4])
          + (" ..." if len(paths) > 4 else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
