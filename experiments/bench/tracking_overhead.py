"""What the research-workflow features cost per round, at the default model sizes.

Per round the server writes its checkpoint (and logs it to MLflow); every
``tracking.samples_every`` rounds it fits a public new user and draws a sample
grid; once per run it logs the pyfunc model. Medians against a local sqlite store
on one core; compare them with ``fleet/round_seconds`` of a default run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch

from experiments.bench.common import median_seconds
from fl.data.fleet import FleetSpec
from fl.tasks import get_task
from fl.tracking.mlflow_model import log_shared_model
from fl.tracking.mlflow_run import quiet_mlflow
from server.checkpoint import Checkpoint, LoopState, save_checkpoint
from server.samples import sample_grid


def run(repeats: int = 5) -> list[dict]:
    torch.set_num_threads(1)
    quiet_mlflow()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        mlflow.set_experiment("bench")
        for name in ("swap", "portrait"):
            task, spec = get_task({"name": name}), FleetSpec(image_size=32)
            model = task.build_model(spec.image_size)
            shared, personal = task.shared_state(model), task.personal_state(model)
            state = LoopState(round=1, shared=shared, history={r: {"m": 1.0} for r in range(21)},
                              devices={d: {"device": f"device-{d:05d}"} for d in range(100)},
                              exhausted=[], panel=list(range(10)), release={"released": 1},
                              rng=np.random.default_rng(0).bit_generator.state)
            path = Path(tmp) / name / "last.pt"
            checkpoint = Checkpoint("r" * 32, "seed: 0\n", personal, state)
            with mlflow.start_run():
                write = median_seconds(lambda p=path, c=checkpoint: save_checkpoint(p, c),
                                       repeats)
                upload = median_seconds(lambda p=path: mlflow.log_artifact(str(p), "checkpoint"),
                                        repeats)
                grid = median_seconds(lambda t=task, s=shared, p=personal, f=spec: sample_grid(
                    t, s, p, f, steps=40), repeats)
                model_log = median_seconds(lambda t=task, s=shared, p=personal, f=spec:
                                           log_shared_model({"name": t.name}, f, s, p, None),
                                           max(repeats // 2, 1))
            rows.append({"task": name, "checkpoint_mb": path.stat().st_size / 2**20,
                         "checkpoint_write_s": write, "checkpoint_log_s": upload,
                         "sample_grid_s": grid, "pyfunc_log_s": model_log})
    return rows
