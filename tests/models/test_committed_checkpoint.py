"""Committed pretraining checkpoints: used only on a matching config hash, and
reproducible by their own command (the first steps replay the logged loss curve)."""

import json
import shlex

import numpy as np
import pytest
import torch

from fl import config as C
from fl.data.fleet import FleetSpec
from fl.pretrain import (
    COMMITTED_DIR,
    cached_pretrain,
    checkpoint_key,
    committed_checkpoint,
    file_sha256,
    pretrain,
    record_path,
)
from fl.tasks import get_task

REPLAY_STEPS = 3
RECORDS = sorted(COMMITTED_DIR.glob("*.record.json")) if COMMITTED_DIR.is_dir() else []


def _command_config(record: dict):
    args = shlex.split(record["command"])
    assert args[:3] == ["python", "-m", "experiments.pretrain"], record["command"]
    return C.compose(args[3:])


@pytest.mark.parametrize("record_file", RECORDS, ids=[p.stem for p in RECORDS])
def test_committed_checkpoint_replays_its_first_steps(record_file):
    record = json.loads(record_file.read_text())
    checkpoint = record_file.parent / (record_file.name.removesuffix(".record.json") + ".pt")
    assert checkpoint.stat().st_size <= 20 * 2**20
    assert file_sha256(checkpoint) == record["sha256"]
    cfg = _command_config(record)
    task, spec, pre = get_task(C.task_params(cfg)), C.fleet_spec(cfg), cfg.pretrain
    key = checkpoint_key(task, spec, pre.steps, pre.batch_size, pre.lr, cfg.seed)
    assert key == record["key"], "the command no longer gives this config hash: re-commit"
    assert committed_checkpoint(task, key) == checkpoint
    losses: list[float] = []
    torch.set_num_threads(1)
    pretrain(task, spec, pre.steps, pre.batch_size, pre.lr, cfg.seed,
             lambda step, loss: losses.append(loss), stop_after=REPLAY_STEPS)
    np.testing.assert_allclose(losses, record["losses"][:REPLAY_STEPS], rtol=2e-3)


def test_the_default_run_uses_a_committed_checkpoint():
    """`make run` finds the committed swap checkpoint by its config hash."""
    cfg = C.compose([])
    task, spec, pre = get_task(C.task_params(cfg)), C.fleet_spec(cfg), cfg.pretrain
    key = checkpoint_key(task, spec, pre.steps, pre.batch_size, pre.lr, cfg.seed)
    assert committed_checkpoint(task, key) is not None, (
        f"no committed checkpoint for the default config (hash {key}): run "
        "`python -m experiments.pretrain pretrain.commit=true`")


def test_committed_checkpoint_only_on_a_matching_hash(tmp_path):
    """A committed file is used for its own hash only, and only while intact."""
    task = get_task({"name": "swap", "width": 4})
    spec = FleetSpec(num_devices=1, image_size=32, num_public=3)
    cache, committed = tmp_path / "cache", tmp_path / "committed"
    logs: list[str] = []
    trained = cached_pretrain(task, spec, 2, 2, 1e-3, 0, cache, logs.append)
    record = json.loads(record_path(trained).read_text())
    assert record["steps"] == 2 and len(record["losses"]) == 2
    committed.mkdir()
    for source in (trained, record_path(trained)):
        (committed / source.name).write_bytes(source.read_bytes())
    trained.unlink()
    key = record["key"]
    found = cached_pretrain(task, spec, 2, 2, 1e-3, 0, cache, logs.append,
                            committed_dir=committed)
    assert found == committed / trained.name and "committed checkpoint" in logs[-1]
    # another config (one more step) has another hash: it pretrains afresh
    other = cached_pretrain(task, spec, 3, 2, 1e-3, 0, cache, logs.append,
                            committed_dir=committed)
    assert other.parent == cache and key not in other.name
    # a damaged committed file is not used
    with open(committed / trained.name, "ab") as damaged:
        damaged.write(b"x")
    assert committed_checkpoint(task, key, committed) is None
