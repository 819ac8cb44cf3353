"""The final shared model as an MLflow model (pyfunc with a signature).

``mlflow.pyfunc.load_model(uri).predict(x)`` runs the released shared weights
with the *public* personal starting point (the mean public identity): what
anyone can compute from the release. A user's own results need their personal
part, which only their device holds (``python -m experiments.generate``).

Input: swap, clip frames ``(N, 3, S, S)`` float32 in [0, 1]; portrait,
conditions ``(N, 8)`` (yaw, pitch, smile, light_x, light_y, backdrop RGB).
Output: images ``(N, 3, S, S)``. The model directory also holds the fedface
checkpoint (``artifacts/shared.pt``), so ``model.init=models:/<name>/<version>``
starts a new run from it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import infer_signature

from fl.data.fleet import FleetSpec, public_identity
from fl.pretrain import load_checkpoint, save_checkpoint
from fl.tasks import get_task

MODEL_NAME = "shared_model"  # the run's logged model (MLflow 3: a LoggedModel)
ENTRY = Path(__file__).with_name("pyfunc_entry.py")  # models from code, not a pickle


class SharedModel(mlflow.pyfunc.PythonModel):
    """Loads the checkpoint and the task from the model's own files."""

    def load_context(self, context) -> None:
        config = context.model_config
        self.task = get_task(json.loads(config["task"]))
        checkpoint = load_checkpoint(context.artifacts["checkpoint"])
        self.model = self.task.build_model(int(config["image_size"]))
        self.model.load_state_dict({**checkpoint["shared"], **checkpoint["personal_init"]},
                                   strict=False)
        self.model.eval()

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None):
        with torch.no_grad():
            return self.model(torch.as_tensor(np.asarray(model_input, np.float32))).numpy()


def log_shared_model(task_params: dict[str, Any], spec: FleetSpec,
                     shared: dict[str, torch.Tensor], personal_init: dict[str, torch.Tensor],
                     registered_name: str | None) -> str:
    """Log (and optionally register) the model; returns its ``models:/`` URI."""
    task = get_task(task_params)
    model = task.build_model(spec.image_size)
    model.load_state_dict({**shared, **personal_init}, strict=False)
    model.eval()
    example = task.model_input(public_identity(spec, 0), spec, rows=2).numpy()
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(Path(tmp) / "shared.pt", shared, personal_init)
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=str(ENTRY), artifacts={"checkpoint": str(path)},
            model_config={"task": json.dumps(task_params), "image_size": spec.image_size},
            signature=signature, input_example=example,
            registered_model_name=registered_name or None, pip_requirements=[])
    if registered_name and info.registered_model_version:
        return f"models:/{registered_name}/{info.registered_model_version}"
    return info.model_uri

