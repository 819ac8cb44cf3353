"""What happens to a round's results: checkpoint, MLflow metrics, sample grid, console.

Two moments per round. When the round's aggregate is *released*, the checkpoint
is written (phase ``released``) before the evaluation panel, MLflow or the
console see anything derived from it: a stop after that resumes with the same
release instead of drawing a new one (two different releases of one round
would let their difference reveal a device's update without noise). When the
round is *done*, the checkpoint is written again and then its metrics are
logged, so a stop between the two re-logs that round's metrics on resume
(``relog_checkpointed_round``) and every round is logged once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from fl.atomic import atomic_write
from fl.data.fleet import FleetSpec
from fl.tasks.base import Task
from fl.tracking.mlflow_run import RunLogger
from server.checkpoint import ARTIFACT_PATH, DONE, Checkpoint, LoopState, save_checkpoint
from server.console import format_round
from server.progress import Progress
from server.resume import local_checkpoint
from server.samples import sample_grid


class RoundRecorder:
    def __init__(self, cfg: DictConfig, logger: RunLogger, task: Task, spec: FleetSpec,
                 personal_init: dict[str, torch.Tensor], progress: Progress,
                 log: Callable[[str], None]) -> None:
        self.cfg, self.logger, self.task, self.spec = cfg, logger, task, spec
        self.personal_init, self.progress, self.log = personal_init, progress, log
        self.rounds = int(cfg.fleet.rounds)
        self.samples_every = int(cfg.tracking.samples_every)
        self.samples_copy = cfg.tracking.get("samples_copy")  # a path, or None
        self.path = local_checkpoint(cfg, logger.run_id)
        self.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self.sampled: set[int] = set()

    def _checkpoint(self, state: LoopState) -> None:
        save_checkpoint(self.path, Checkpoint(self.logger.run_id, self.config_yaml,
                                              self.personal_init, state))
        self.logger.log_artifact(self.path, ARTIFACT_PATH)

    def released(self, rnd: int, state: LoopState) -> None:
        """Round ``rnd``'s aggregate exists: persist it before it is used."""
        self._checkpoint(state)

    def round_done(self, rnd: int, metrics: dict[str, float], state: LoopState) -> None:
        self._checkpoint(state)
        self.logger.log_metrics(metrics, step=rnd)
        if self.samples_every > 0 and (rnd % self.samples_every == 0 or rnd == self.rounds):
            self.samples(rnd, state.shared)
        self.log(format_round(rnd, self.rounds, metrics) + "  " + self.progress.timing(rnd))

    def samples(self, rnd: int, shared: dict[str, torch.Tensor]) -> None:
        image = sample_grid(self.task, shared, self.personal_init, self.spec,
                            int(self.cfg.fleet.newuser_steps), int(self.cfg.seed))
        self.logger.log_image(image, f"samples/round_{rnd:04d}.png")
        self.sampled.add(rnd)
        if self.samples_copy:  # the README's picture: `make run` keeps it current
            atomic_write(self.samples_copy, lambda path: image.save(path, format="PNG",
                                                                     optimize=True))

    def final_samples(self, last_round: int, shared: dict[str, torch.Tensor]) -> None:
        """A run that stopped early still ends with a grid of its final model."""
        if self.samples_every > 0 and last_round not in self.sampled:
            self.samples(last_round, shared)

    def relog_checkpointed_round(self, state: LoopState) -> None:
        """A run stopped between its checkpoint and its metrics: log them now."""
        if state.phase != DONE:
            return  # a released round's metrics are logged when it is done
        metrics = state.history.get(state.round, {})
        if metrics and state.round not in self.logger.logged_steps(next(iter(metrics))):
            self.logger.log_metrics(metrics, step=state.round)
