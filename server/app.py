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
from dataclasses import dataclass, replace

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from hydra.utils import instantiate
from omegaconf import DictConfig

from fl import config as C
from fl import protocol as P
from fl.attributes import attribute_net
from fl.console import say
from fl.faults import describe as describe_faults
from fl.pretrain import load_checkpoint
from fl.privacy.noise import SEEDED, SEEDED_CAVEAT
from fl.privacy.plan import privacy_plan
from fl.privacy.release import make_release
from fl.tasks import get_task
from fl.tracking.mlflow_run import OBJECTIVE_TAG, RunLogger
from fl.tracking.model_init import init_source, resolve_init
from server.checkpoint import RELEASED, Checkpoint
from server.console import format_summary, last_value
from server.loop import LoopSettings, RoundLoop
from server.progress import Progress
from server.recorder import RoundRecorder
from server.resume import resumed_config

NOISE_TAG = "fedface.noise"  # privacy.noise of the run: secure | seeded
FAULTS_TAG = "fedface.faults"  # simulated faulty devices: none | share=... kinds=...


@dataclass
class Summary:
    run_id: str
    ui_command: str
    history: dict[int, dict[str, float]]

    def final(self, key: str) -> float:
        """Last logged value of an MLflow metric key (nan if never logged)."""
        return last_value(self.history, key)


def build_strategy(cfg: DictConfig):
    """The configured Flower strategy (``_target_`` allow-listed by ``fl.config``);
    fedface samples devices itself, so the strategy is told to use every node of
    the grid view it is given. fedface's own keys (``C.FEDFACE_STRATEGY_KEYS``)
    configure the release, not the strategy."""
    arguments = {k: v for k, v in cfg.strategy.items() if k not in C.FEDFACE_STRATEGY_KEYS}
    return instantiate(arguments, fraction_train=1.0, fraction_evaluate=1.0,
                       min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1,
                       weighted_by_key=P.WEIGHT_KEY)


def _starting_point(cfg: DictConfig, task, spec, log: Callable[[str], None]):
    """(shared weights, public personal init, where they came from) of a new run."""
    init_path = resolve_init(cfg, log)
    checkpoint = load_checkpoint(init_path)
    # Personal pieces the checkpoint does not hold (e.g. an adapter that
    # pretraining never trains) start from their fresh initialisation.
    personal_init = {**task.personal_state(task.build_model(spec.image_size)),
                     **checkpoint["personal_init"]}
    return checkpoint["shared"], personal_init, init_path


def run_experiment(grid: Grid, cfg: DictConfig, log: Callable[[str], None] = say,
                   resume: Checkpoint | None = None) -> Summary:
    """One federated run, or the rest of one from its checkpoint (``resume``)."""
    C.validate(cfg)
    task = get_task(C.task_params(cfg))
    spec = C.fleet_spec(cfg)
    # The evaluation's attribute net (fl.attributes), trained or loaded once here, so
    # the panel's devices and the new-user check find it cached.
    attribute_net(spec.image_size, log=log)
    plan = privacy_plan(cfg)
    f = cfg.fleet
    if resume is None:
        shared, personal_init, init_path = _starting_point(cfg, task, spec, log)
        logger = RunLogger(cfg)
        logger.log_params(plan.params())
        logger.set_tag("fedface.init", init_source(cfg, init_path))
        logger.set_tag(OBJECTIVE_TAG, C.objective_key(cfg))
        logger.set_tag(NOISE_TAG, plan.noise)
        logger.set_tag(FAULTS_TAG, describe_faults(*C.fault_settings(cfg)))
        if plan.noise == SEEDED:
            log(f"privacy.noise=seeded: {SEEDED_CAVEAT}")
        log(f"MLflow run {logger.run_id} ({logger.uri})")
    else:
        shared, personal_init = resume.loop.shared, resume.personal_init
        logger = RunLogger(cfg, resume_run_id=resume.run_id)
        logger.set_tag("fedface.resumed_after_round", str(resume.loop.round))
        where = f"round {resume.loop.round}" + (
            "'s release (persisted; it is evaluated, never drawn again)"
            if resume.loop.phase == RELEASED else "")
        log(f"resuming MLflow run {logger.run_id} after {where} of {f.rounds} ({logger.uri})")
    recipe = replace(C.recipe(cfg, plan.photo), run=logger.run_id)
    settings = LoopSettings(
        rounds=f.rounds, devices_per_round=f.devices_per_round, sampling=f.sampling,
        eval_devices=f.eval_devices, num_devices=f.num_devices, newuser_every=f.newuser_every,
        newuser_identities=f.newuser_identities, newuser_steps=f.newuser_steps,
        round_timeout=f.round_timeout, seed=cfg.seed, photo=plan.photo,
        noise=plan.noise, start_quorum=f.start_quorum, unavailable_after=f.unavailable_after,
        retry_after=f.retry_after, max_examples=spec.photos_max,
        secure=bool(cfg.aggregation.secure), num_shares=float(cfg.aggregation.num_shares),
        threshold=float(cfg.aggregation.threshold),
        min_survivors=int(cfg.aggregation.min_survivors), device=recipe.device)
    progress = Progress(f.rounds)
    recorder = RoundRecorder(cfg, logger, task, spec, personal_init, progress, log)
    if resume is not None:
        recorder.relog_checkpointed_round(resume.loop)
    strategy = build_strategy(cfg)
    release = make_release(plan.user, strategy, task.is_device_trained, plan.noise, cfg.seed,
                           float(cfg.strategy.update_norm_bound),
                           int(cfg.strategy.max_examples))
    loop = RoundLoop(grid, strategy, release, task, spec, settings,
                     P.round_config(recipe, C.task_params(cfg), spec),
                     personal_init, recorder, progress, log)
    try:
        result = loop.run(shared, resume.loop if resume else None)
        if result.stopped:
            log(f"stopped early: {result.stopped}")
            logger.set_tag("fedface.stopped", result.stopped)
        logger.log_privacy_review(plan, result.history, result.devices, result.stopped)
        logger.log_system_figure(result.history)
        recorder.final_samples(max(result.history), result.shared)
        model_uri = logger.log_shared_model(result.shared, personal_init, C.task_params(cfg),
                                            spec, cfg.tracking.register_model)
    except BaseException:
        logger.end("FAILED")  # everything logged so far stays in MLflow
        raise
    logger.end()
    summary = Summary(logger.run_id, logger.ui_command(), result.history)
    log(format_summary(summary.history, plan, logger.run_id, summary.ui_command,
                       cfg.tracking.experiment_name))
    log(f"shared model {model_uri}")
    return summary


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: Hydra overrides come in the run config,
    e.g. ``flwr run . --run-config "overrides='fleet.rounds=5 privacy=none'"``."""
    overrides = shlex.split(str(context.run_config.get("overrides", "")))
    cfg, checkpoint = C.compose(overrides), None
    if cfg.resume:
        cfg, checkpoint = resumed_config(cfg, overrides)
    run_experiment(grid, cfg, resume=checkpoint)



