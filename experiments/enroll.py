"""Enroll a new user on their own device: selfies in, a personal part out.

    python -m experiments.enroll --photos selfies/ --model <run id | runs:/.. | models:/..> \\
        --state-dir /path/to/device/state
    python -m experiments.generate --model <same> --state-dir /path/to/device/state \\
        --controls "yaw=0.4,smile=0.9" --out portraits/

Each JPEG/PNG in ``--photos`` is decoded, its face found and cropped the way the
model's training images are framed (``fl.data.faces``: OpenCV's Haar cascade); a
file with no face, or that is no photo, is named with the reason and skipped.
Then the personal part alone (the identity embedding, and the portrait adapter
if the run has one) is fitted to those faces on the frozen shared weights of
``--model``, and written into the device's state directory through its store
(``clients.device_state``: locked, written whole, renamed into place), stamped
with the model's run id, where ``experiments.generate --state-dir`` finds it.

Everything happens on this machine. The shared model and its configuration are
*read* from MLflow; nothing is written there, and no photo, face or weight
leaves the device.

Portrait controls of a selfie are unknown unless ``--photos`` holds a
``controls.csv`` (``file,yaw,pitch,smile[,light_x,light_y]``, as a deployed
device's ``data-dir``). Without it, yaw, pitch and smile are fitted per photo
alongside the identity (analysis by synthesis: the controls that let the
generator redraw that photo best), the light direction is estimated from the
image and the backdrop measured from its border (``fl.latent_controls``).

**Privacy.** The fit runs without DP, on the device, for the best likeness; its
result never leaves the device. It is stamped "fitted without DP", and the
ClientApp refuses to train with it under photo-level DP (its photos would reach
every later update through it, outside any accounting): docs/privacy.md. Before
such a device joins photo-level DP training, ``--forget`` removes the personal
part (the ledger stays); the run then fits one from the public start under DP.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clients.device_state import (
    GENERATION_PREFIX,
    PERSONAL_FILE,
    DeviceStore,
    StoreUnavailable,
)
from experiments.generate import GenerateError, load_run, source_run
from fl import config as C
from fl.data.controls import light_from_images
from fl.data.faces import Face, UnusablePhoto, crop_face, photo_files
from fl.data.folders import read_controls
from fl.latent_controls import PhotoConditions
from fl.privacy.ledger import PhotoLedger
from fl.tasks import Task, get_task
from fl.tracking.mlflow_run import quiet_mlflow

CONTROLS_FILE = "controls.csv"
ENROLL_ROUND = 0  # the stamp's round: enrollment precedes any round of a run


class EnrollError(ValueError):
    pass


@dataclass
class Enrollment:
    state: Path  # the generation written
    run_id: str
    used: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, why)
    loss: float = float("nan")


def find_faces(folder: Path, size: int, say) -> tuple[list[Face], list[tuple[str, str]]]:
    """The faces of the folder's photos; each file without one is named and skipped."""
    try:
        files = photo_files(folder, besides=(CONTROLS_FILE,))
    except FileNotFoundError as err:
        raise EnrollError(str(err)) from None
    faces, skipped = [], []
    for path in files:
        try:
            faces.append(crop_face(path, size))
        except UnusablePhoto as err:
            skipped.append((path.name, str(err)))
            say(f"{path.name}: skipped ({err})")
    return faces, skipped


def _labels(folder: Path, faces: list[Face]) -> np.ndarray | None:
    """Controls of every face from ``controls.csv``, or None if there is none."""
    csv = folder / CONTROLS_FILE
    if not csv.is_file():
        return None
    try:
        table = read_controls(str(csv))
    except ValueError as err:
        raise EnrollError(str(err)) from None
    missing = [f.path.name for f in faces if f.path.name not in table]
    if missing:
        raise EnrollError(f"{csv} has no row for {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''}; add them or remove the CSV "
                          "(controls are then fitted per photo)")
    rows = [table[f.path.name] for f in faces]
    light = light_from_images(np.stack([f.image for f in faces]))
    return np.asarray([list(r) if len(r) == 5 else [*r, *light[i]] for i, r in enumerate(rows)],
                      np.float32)


def fit_personal(task: Task, model: nn.Module, photos: np.ndarray, labels: np.ndarray | None,
                 steps: int, lr: float, batch_size: int, seed: int) -> float:
    """Fit the personal part (and, for a portrait without labels, each photo's
    yaw, pitch and smile) on the frozen shared weights; the last steps' mean loss.

    Adam, as ``Task.fit_personal`` (the server's new-user check) uses: without
    DP there is no noise for it to amplify (clients.trainer explains why devices
    use SGD under DP)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        param.requires_grad_(task.is_personal(name))
    params = [p for n, p in model.named_parameters() if task.is_personal(n)]
    conds = PhotoConditions.of(photos, labels) if task.needs_controls else None
    if conds is not None and conds.fitted.requires_grad:
        params.append(conds.fitted)
    optimizer = torch.optim.Adam(params, lr=lr)
    images = torch.from_numpy(photos)
    model.train()
    losses = []
    for _ in range(steps):
        index = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)
        batch = (images[index],) if conds is None else (images[index], conds(index))
        loss = task.device_loss(model, *batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-max(1, steps // 10):]
    return float(sum(tail) / len(tail))


def enroll(args: argparse.Namespace, say=print) -> Enrollment:
    quiet_mlflow()
    import mlflow

    mlflow.set_tracking_uri(args.tracking_uri)
    run_id = source_run(args.model)
    cfg, checkpoint = load_run(run_id, args.tracking_uri)  # read only: nothing is logged
    task, spec = get_task(C.task_params(cfg)), C.fleet_spec(cfg)
    folder = Path(args.photos)
    faces, skipped = find_faces(folder, spec.image_size, say)
    if not faces:
        raise EnrollError(f"no face found in any of the {len(skipped)} files in {folder}: "
                          "nothing was written. Give photos where the face is upright, "
                          "frontal and at least a fifth of the picture")
    photos = np.stack([f.image for f in faces])
    labels = _labels(folder, faces) if task.needs_controls else None
    model = task.build_model(spec.image_size)
    model.load_state_dict({**checkpoint["shared"], **checkpoint["personal_init"]}, strict=False)
    loss = fit_personal(task, model, photos, labels, args.steps, args.lr, args.batch_size,
                        args.seed)
    personal = {k: v.detach().clone() for k, v in task.personal_state(model).items()}
    store = DeviceStore(args.state_dir, run_id)
    try:
        with store.lock():
            ledger = store.ledger() or PhotoLedger(accountant=cfg.privacy.photo.accountant) \
                .to_config()  # carried over unchanged: no DP step ran
            state = store.save(ENROLL_ROUND, personal, ledger, personal_dp=False)
    except StoreUnavailable as err:
        raise EnrollError(f"{err}; nothing was written") from None
    return Enrollment(state, run_id, [f.path.name for f in faces], skipped, loss)


def forget(state_dir: str) -> int:
    """Remove every personal part from a state directory, keeping its ledger (the
    spend stays counted). The device then starts its next run from the public
    personal part, fitted from there under the run's DP: the refit a device
    needs after an enrollment without DP before it joins photo-level DP training.
    Returns how many files were removed."""
    root = Path(state_dir)
    if not root.is_dir():
        raise EnrollError(f"--state-dir {state_dir} is not a directory")
    try:
        with DeviceStore(root, "").lock():
            files = sorted(root.glob(f"{GENERATION_PREFIX}*/{PERSONAL_FILE}"))
            for path in files:
                path.unlink()
    except StoreUnavailable as err:
        raise EnrollError(f"{err}; nothing was removed") from None
    return len(files)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.enroll",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", help="folder of selfies (JPEG/PNG)")
    p.add_argument("--model", help="run id, runs:/<run id>/..., models:/name/v")
    p.add_argument("--state-dir", required=True, help="this device's state directory")
    p.add_argument("--forget", action="store_true",
                   help="remove the personal parts from --state-dir instead (keeps the "
                        "ledger): the refit before photo-level DP training")
    p.add_argument("--steps", type=int, default=300, help="fitting steps (default 300)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam step size (default 0.05)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tracking-uri",
                   default=os.environ.get("MLFLOW_TRACKING_URI", C.DEFAULT_TRACKING_URI))
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.forget:
        try:
            removed = forget(args.state_dir)
        except EnrollError as err:
            print(f"fedface enroll: {err}", file=sys.stderr)
            return 2
        print(f"removed {removed} personal part(s) from {args.state_dir}; the ledger is kept. "
              "The device's next run starts from the public personal part")
        return 0
    if not (args.photos and args.model):
        p.error("--photos and --model are required (or --forget)")
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            print(f"fedface enroll: --{name.replace('_', '-')} must be at least 1",
                  file=sys.stderr)
            return 2
    try:
        done = enroll(args)
    except (EnrollError, GenerateError) as err:
        print(f"fedface enroll: {err}", file=sys.stderr)
        return 2
    print(f"enrolled from {len(done.used)} photos ({len(done.skipped)} skipped), fit loss "
          f"{done.loss:.4f}: personal part of run {done.run_id} written to {done.state}. "
          "Fitted without DP: it stays on this device, and this device will not join "
          "photo-level DP training with it (docs/privacy.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
