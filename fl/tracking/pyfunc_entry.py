"""Models-from-code entry of fedface's MLflow model: MLflow stores this file, not
a pickled object (``fl.tracking.mlflow_model`` has the why)."""

import mlflow

from fl.tracking.mlflow_model import SharedModel

mlflow.models.set_model(SharedModel())
