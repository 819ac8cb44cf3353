"""The fedface ServerApp: one experiment = pretrained start, rounds, MLflow run.

Two ways in, one code path (``run_experiment``):

* ``python -m experiments.train`` binds the composed Hydra config to a ServerApp
  built by ``server.simulation`` (in-process simulation);
* ``flwr run .`` loads the module-level ``app`` below, which composes the same
  Hydra config from the run config's ``overrides`` string.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from hydra.utils import instantiate
from omegaconf import DictConfig

from fl import config as C
from fl import protocol as P
from fl.console import say
from fl.pretrain import load_checkpoint
from fl.privacy.plan import privacy_plan
from fl.tasks import get_task
from fl.tracking.mlflow_run import RunLogger
from fl.tracking.model_init import init_source, resolve_init
from server.console import format_round, format_summary, last_value
from server.loop import LoopSettings, RoundLoop


@dataclass
class Summary:
    run_id: str
    ui_command: str
    history: dict[int, dict[str, float]]

    def final(self, key: str) -> float:
        """Last logged value of an MLflow metric key (nan if never logged)."""
        return last_value(self.history, key)


def build_strategy(cfg: DictConfig):
    """The configured Flower strategy; fedface samples devices itself, so the
    strategy is told to use every node of the grid view it is given."""
    return instantiate(cfg.strategy, fraction_train=1.0, fraction_evaluate=1.0,
                       min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1,
                       weighted_by_key=P.WEIGHT_KEY)


def run_experiment(grid: Grid, cfg: DictConfig, log: Callable[[str], None] = say) -> Summary:
    C.validate(cfg)
    task = get_task(C.task_params(cfg))
    spec = C.fleet_spec(cfg)
    init_path = resolve_init(cfg, log)
    checkpoint = load_checkpoint(init_path)
    # Personal pieces the checkpoint does not hold (e.g. an adapter that
    # pretraining never trains) start from their fresh initialisation.
    personal_init = {**task.personal_state(task.build_model(spec.image_size)),
                     **checkpoint["personal_init"]}
    plan = privacy_plan(cfg)
    recipe = C.recipe(cfg, plan.photo)
    f = cfg.fleet
    settings = LoopSettings(
        rounds=f.rounds, devices_per_round=f.devices_per_round, sampling=f.sampling,
        eval_devices=f.eval_devices, num_devices=f.num_devices, newuser_every=f.newuser_every,
        newuser_identities=f.newuser_identities, newuser_steps=f.newuser_steps,
        round_timeout=f.round_timeout, seed=cfg.seed, photo=plan.photo, user=plan.user)
    logger = RunLogger(cfg)
    logger.log_params(plan.params())
    logger.set_tag("fedface.init", init_source(cfg, init_path))
    log(f"MLflow run {logger.run_id} ({logger.uri})")

    def on_round(rnd: int, metrics: dict[str, float]) -> None:
        logger.log_metrics(metrics, step=rnd)
        log(format_round(rnd, f.rounds, metrics))

    loop = RoundLoop(grid, build_strategy(cfg), task, spec, settings,
                     P.round_config(recipe, C.task_params(cfg), spec),
                     personal_init, on_round)
    try:
        result = loop.run(checkpoint["shared"])
        if result.stopped:
            log(f"stopped early: {result.stopped}")
            logger.set_tag("fedface.stopped", result.stopped)
        logger.log_shared_model(result.shared, personal_init)
        logger.log_privacy_review(plan, result.history, result.devices, result.stopped)
    except BaseException:
        logger.end("FAILED")  # everything logged so far stays in MLflow
        raise
    logger.end()
    summary = Summary(logger.run_id, logger.ui_command(), result.history)
    log(format_summary(summary.history, plan, logger.run_id, summary.ui_command,
                       cfg.tracking.experiment_name))
    return summary


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: Hydra overrides come in the run config,
    e.g. ``flwr run . --run-config "overrides='fleet.rounds=5 privacy=none'"``."""
    overrides = shlex.split(str(context.run_config.get("overrides", "")))
    run_experiment(grid, C.compose(overrides))



