"""Checkpoint and resume: a run killed mid-way and resumed ends where an
uninterrupted run ends, with no privacy spent lost or counted twice."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from fl.config import ConfigError, compose
from fl.tracking import keys as K
from server.checkpoint import Checkpoint, LoopState, load_checkpoint, save_checkpoint
from server.resume import resumed_config

REPO = Path(__file__).resolve().parents[2]
FINAL_KEYS = (K.PHOTO_EPS_MAX, K.PHOTO_EPS_MEAN, K.PHOTO_EPS_P95, K.USER_EPS)


def _train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments.train", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _run_id(output: str) -> str:
    return re.search(r"MLflow run ([0-9a-f]{32})", output).group(1)


@pytest.mark.slow
def test_a_killed_run_resumed_spends_exactly_what_an_uninterrupted_run_spends(
        tiny_overrides, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rounds = 4
    overrides = [o for o in tiny_overrides
                 if not o.startswith(("fleet.rounds", "checkpoint.dir"))] + [
        f"fleet.rounds={rounds}", f"tracking.uri={uri}", "tracking.samples_every=0",
        f"checkpoint.dir={tmp_path / 'checkpoints'}", "fleet.sampling=fixed",
        "fleet.devices_per_round=2"]

    whole = _train([*overrides, f"hydra.run.dir={tmp_path / 'whole'}"])
    output, _ = whole.communicate(timeout=400)
    assert whole.returncode == 0, output[-3000:]
    whole_id = _run_id(output)

    killed = _train([*overrides, f"hydra.run.dir={tmp_path / 'killed'}"])
    first_line = ""
    while "MLflow run" not in first_line:
        first_line = killed.stdout.readline()
        assert first_line or killed.poll() is None, "the run ended before it started"
    run_id = _run_id(first_line)
    checkpoint = tmp_path / "checkpoints" / run_id / "last.pt"
    while not checkpoint.is_file() or load_checkpoint(checkpoint).loop.round < 1:
        assert killed.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    stopped_after = load_checkpoint(checkpoint).loop.round
    assert stopped_after < rounds

    resumed = _train([f"resume={run_id}", f"tracking.uri={uri}",
                      f"checkpoint.dir={tmp_path / 'checkpoints'}",
                      f"hydra.run.dir={tmp_path / 'resumed'}"])
    output, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, output[-3000:]
    assert f"resuming MLflow run {run_id} after round {stopped_after}" in output

    client = mlflow.MlflowClient(uri)
    run, reference = client.get_run(run_id), client.get_run(whole_id)
    assert run.info.status == "FINISHED"
    for key in FINAL_KEYS:
        assert run.data.metrics[key] == pytest.approx(reference.data.metrics[key], rel=1e-9), key
    # every round is in the same MLflow run exactly once
    steps = [m.step for m in client.get_metric_history(run_id, K.PHOTO_EPS_MAX)]
    assert steps == list(range(1, rounds + 1))
    assert [m.step for m in client.get_metric_history(run_id, K.SWAP_PSNR)] == \
        list(range(rounds + 1))
    # the devices' ledgers were kept on their storage, per run, not by the server
    storage = Path(next(o.split("=", 1)[1] for o in overrides
                        if o.startswith("devices.storage_dir")))
    assert list(storage.glob(f"device-*/state/{run_id}/gen-*/ledger.json"))
    assert load_checkpoint(checkpoint).loop.round == rounds


def _checkpoint(tmp_path: Path, cfg) -> Path:
    """A round-1 checkpoint of a run that exists in ``cfg``'s MLflow store, with
    ``cfg`` logged as its configuration (a resume checks both)."""
    from omegaconf import OmegaConf

    from fl.tracking.mlflow_run import CONFIG_ARTIFACT

    client = mlflow.MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name("resume-tests")
    run_id = client.create_run(experiment.experiment_id if experiment else
                               client.create_experiment("resume-tests")).info.run_id
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    client.log_text(run_id, config_yaml, CONFIG_ARTIFACT)
    state = LoopState(round=1, shared={"w": torch.zeros(2)}, history={0: {}, 1: {}},
                      devices={}, exhausted=[], panel=[], release={"released": 1},
                      rng={"bit_generator": "PCG64"})
    return save_checkpoint(tmp_path / "last.pt", Checkpoint(run_id, config_yaml, {}, state))


def test_resume_keeps_the_runs_own_configuration_and_refuses_changes(tmp_path):
    uri = f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"
    original = compose(["fleet.rounds=7", "privacy=photo", uri])
    path = _checkpoint(tmp_path, original)
    cfg, checkpoint = resumed_config(compose([f"resume={path}", uri]),
                                     [f"resume={path}", "verbose=true", uri])
    assert cfg.fleet.rounds == 7 and cfg.privacy.user.enabled is False and cfg.verbose
    assert checkpoint.loop.round == 1
    with pytest.raises(ConfigError, match=r"fleet.rounds=9 cannot change on resume"):
        resumed_config(compose([f"resume={path}", uri]),
                       [f"resume={path}", "fleet.rounds=9", uri])


def test_resume_of_an_unknown_run_says_what_to_give(tmp_path):
    cfg = compose([f"resume={'f' * 32}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
                   f"checkpoint.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="neither a checkpoint file nor an MLflow run"):
        resumed_config(cfg, [])
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    # A checkpoint whose run is not in the store is not trusted (the check fails closed).
    elsewhere = save_checkpoint(tmp_path / "elsewhere.pt", Checkpoint(
        "e" * 32, "seed: 0\n", {}, LoopState(round=0, shared={}, history={}, devices={},
                                             exhausted=[], panel=[], release={"released": 0},
                                             rng={})))
    with pytest.raises(ConfigError, match="cannot be read at"):
        resumed_config(compose([f"resume={elsewhere}", *cfg_args(tmp_path)]),
                       [f"resume={elsewhere}", *cfg_args(tmp_path)])
    with pytest.raises(ValueError, match="not a readable fedface server checkpoint"):
        resumed_config(compose([f"resume={tmp_path / 'junk.pt'}"]), [])


def cfg_args(tmp_path: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", f"checkpoint.dir={tmp_path}"]


def test_a_checkpoint_older_than_the_runs_newest_is_refused_with_the_one_to_use(tmp_path):
    """Resuming from an old copy would release rounds 2.. again with new noise."""
    import dataclasses

    cfg = compose([f"checkpoint.dir={tmp_path / 'checkpoints'}",
                   f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    old = load_checkpoint(_checkpoint(tmp_path, cfg))
    newest = tmp_path / "checkpoints" / old.run_id / "last.pt"
    save_checkpoint(newest, dataclasses.replace(
        old, loop=dataclasses.replace(old.loop, round=2, phase="released",
                                      release={"released": 2})))
    args = [f"resume={tmp_path / 'last.pt'}", f"checkpoint.dir={tmp_path / 'checkpoints'}",
            f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    with pytest.raises(ConfigError, match=r"already reached round 2 \(released\).*"
                                          rf"resume={old.run_id}"):
        resumed_config(compose(args), args)
    resumed_config(compose([f"resume={newest}", *args[1:]]), [f"resume={newest}", *args[1:]])


def test_a_checkpoint_whose_config_would_run_code_is_refused(tmp_path):
    """The reviewer's malicious checkpoint: a nested ``_target_`` in the strategy
    made resume call ``os.makedirs``. Now nothing outside Flower's strategies is
    instantiated, and nothing runs."""
    from omegaconf import OmegaConf

    pwned = tmp_path / "pwned"
    cfg = compose([f"checkpoint.dir={tmp_path / 'checkpoints'}",
                   f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    for strategy in ({"_target_": "flwr.serverapp.strategy.FedAvg",
                      "inner": {"_target_": "os.makedirs", "name": str(pwned)}},
                     {"_target_": "os.makedirs", "name": str(pwned)}):
        malicious = OmegaConf.to_container(cfg)
        malicious["strategy"] = strategy
        path = _checkpoint(tmp_path, OmegaConf.create(malicious))
        args = [f"resume={path}", f"checkpoint.dir={tmp_path / 'checkpoints'}",
                f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
        with pytest.raises(ConfigError, match="_target_"):
            resumed_config(compose(args), args)
    assert not pwned.exists()


def test_a_checkpoint_that_disagrees_with_the_runs_mlflow_history_is_refused(tmp_path):
    """An edited checkpoint that counts fewer released rounds, or lower epsilons,
    would let a resume spend the user-level budget again: the run's MLflow
    history (one entry per completed round) gives it away."""
    import dataclasses

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = compose([f"checkpoint.dir={tmp_path / 'checkpoints'}", f"tracking.uri={uri}"])
    client = mlflow.MlflowClient(uri)
    honest = load_checkpoint(_checkpoint(tmp_path, cfg))
    run_id = honest.run_id
    history = {r: {K.DEVICES_SAMPLED: 10.0, K.DEVICES_TRAINED: 9.0, K.USER_EPS: 0.5 * r}
               for r in (1, 2, 3)}
    for r, metrics in history.items():
        for key, value in metrics.items():
            client.log_metric(run_id, key, value, step=r)
    honest.loop = dataclasses.replace(honest.loop, round=3, release={"released": 3},
                                      history={0: {}, **history})
    edits = {
        "counts 0 released rounds": {"release": {"released": 0}},
        "MLflow logged round 3, after its round 1": {
            "round": 1, "release": {"released": 1}, "history": {0: {}, 1: history[1]}},
        "of round 3 is 0.0, MLflow logged 1.5": {
            "history": {0: {}, **history, 3: history[3] | {K.USER_EPS: 0.0}}},
    }
    edited_config = honest.config_yaml.replace("budget_epsilon: 8.0", "budget_epsilon: 0")
    assert edited_config != honest.config_yaml
    args = [f"checkpoint.dir={tmp_path / 'checkpoints'}", f"tracking.uri={uri}"]
    for problem, change in edits.items():
        edited = dataclasses.replace(honest, loop=dataclasses.replace(honest.loop, **change))
        path = save_checkpoint(tmp_path / "edited.pt", edited)
        with pytest.raises(ConfigError, match=re.escape(problem)):
            resumed_config(compose([f"resume={path}", *args]), [f"resume={path}", *args])
    path = save_checkpoint(tmp_path / "edited.pt", dataclasses.replace(
        honest, config_yaml=edited_config))
    with pytest.raises(ConfigError, match=r"privacy.photo.budget_epsilon=0 \(logged 8.0\)"):
        resumed_config(compose([f"resume={path}", *args]), [f"resume={path}", *args])
    path = save_checkpoint(tmp_path / "honest.pt", honest)
    resumed_config(compose([f"resume={path}", *args]), [f"resume={path}", *args])
