"""The one place that starts Flower's Simulation Engine.

Choice (see docs/architecture.md): ``flwr.simulation.run_simulation`` in-process,
although Flower 1.41 marks it deprecated in favour of ``flwr run``. In-process,
the Hydra job, its MLflow run and the ServerApp share one Python process, so a
Hydra multirun is a loop of ordinary function calls, the objective value comes
straight back to a sweeper, and no background SuperLink outlives the command.
``flwr run .`` stays supported for deployments (``server.app.app``,
``clients.app.app``), with the same ServerApp/ClientApp code. If Flower removes
``run_simulation``, only this module changes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from omegaconf import DictConfig

from clients.app import app as default_client_app
from fl.config import validate
from server.app import Summary, run_experiment
from server.checkpoint import Checkpoint
from server.engine_nodes import EngineGrid, recording_engine_nodes


class _DropChosenDeprecation(logging.Filter):
    """``run_simulation`` is deprecated, and we chose it knowingly (module doc)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def _quiet_framework_logs(verbose: bool) -> None:
    """Keep Flower's own console handler to warnings; its records still reach the
    root logger, which Hydra writes to the job's log file (configs/config.yaml)."""
    flwr_logger = logging.getLogger("flwr")
    if not any(isinstance(f, _DropChosenDeprecation) for f in flwr_logger.filters):
        flwr_logger.addFilter(_DropChosenDeprecation())
    if verbose:
        return
    for handler in flwr_logger.handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def ray_backend_config(cfg: DictConfig) -> dict:
    """Flower's Ray backend settings for this run.

    ``client_resources``: each simulated device's share of a machine. Ray runs as
    many devices at once as the CPUs and GPUs allow, so ``fleet.gpus_per_device``
    0.25 lets four devices share one GPU. ``init_args`` go to ``ray.init``
    (Flower's documented way to configure Ray); with ``fleet.ray_address`` that
    is ``ray.init(address=...)``, which joins a running Ray cluster (started with
    ``ray start --head`` and ``ray start --address``, docs/configuration.md), so
    the simulation uses every node's resources instead of starting a local Ray.
    """
    init_args = {"logging_level": logging.ERROR, "log_to_driver": bool(cfg.verbose),
                 "include_dashboard": False}
    if cfg.fleet.get("ray_address"):
        init_args["address"] = str(cfg.fleet.ray_address)
    return {"client_resources": {"num_cpus": float(cfg.fleet.cpus_per_device),
                                 "num_gpus": float(cfg.fleet.get("gpus_per_device") or 0.0)},
            "init_args": init_args}


def simulate(cfg: DictConfig, wrap_grid: Callable[[Grid], Grid] | None = None,
             resume: Checkpoint | None = None, client_app: ClientApp | None = None) -> Summary:
    """Run one experiment on a simulated fleet of ``fleet.num_devices`` devices
    (or the rest of one, from its checkpoint ``resume``).

    ``wrap_grid`` lets an observer see every message (the tests use it to check
    that nothing personal leaves a device). ``client_app`` replaces fedface's
    ClientApp; only the audit passes one (``clients.audit``: canaries planted).
    """
    validate(cfg)  # also sizes an on-disk fleet, which decides num_supernodes below
    if (cfg.fleet.get("backend") or "ray") == "pool":
        return _simulate_in_pool(cfg, wrap_grid, resume, client_app or default_client_app)
    outcome: dict[str, Summary] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context) -> None:
        grid = EngineGrid(grid, engine_nodes)  # node -> device index, without a roll call
        try:
            outcome["summary"] = run_experiment(wrap_grid(grid) if wrap_grid else grid, cfg,
                                                resume=resume)
        except BaseException as err:  # Flower only logs it; the caller gets it below
            outcome["error"] = err
            raise

    _quiet_framework_logs(bool(cfg.verbose))
    # Each simulated device trains with one thread; Ray runs as many as cores allow.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    backend_config = ray_backend_config(cfg)
    with recording_engine_nodes() as engine_nodes:
        run_simulation(server_app=server_app, client_app=client_app or default_client_app,
                       num_supernodes=int(cfg.fleet.num_devices),
                       backend_config=backend_config, verbose_logging=bool(cfg.verbose))
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise RuntimeError("the simulation ended without finishing the experiment; see the "
                           "Flower log (the Hydra job's .log file, or rerun with verbose=true)")
    return outcome["summary"]


def _simulate_in_pool(cfg: DictConfig, wrap_grid: Callable[[Grid], Grid] | None,
                      resume: Checkpoint | None, client_app: ClientApp) -> Summary:
    """``fleet.backend=pool``: the same ServerApp loop and ClientApp, with the
    devices run by ``server.pool.PoolGrid`` instead of Flower's engine."""
    from server.pool import PoolGrid

    threads = max(1, int(cfg.fleet.cpus_per_device))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = max(1, int((cores or 1) // float(cfg.fleet.cpus_per_device)))
    with PoolGrid(client_app, int(cfg.fleet.num_devices), workers, threads) as grid:
        return run_experiment(wrap_grid(grid) if wrap_grid else grid, cfg, resume=resume)
