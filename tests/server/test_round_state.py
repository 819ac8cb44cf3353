"""Pieces of the server's round bookkeeping: strategy state in checkpoints,
progress lines, sample grids from public identities, the sweep frontier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvgM

from experiments.report import Row, frontier, short_labels
from fl.data.fleet import PUBLIC_ID_OFFSET, FleetSpec, swap_benchmark, synthetic_device
from fl.data.synthfaces import Identity, render
from fl.tasks import get_task
from fl.tasks.base import SampleColumn
from fl.tasks.portrait import control_sweep
from server.checkpoint import (
    Checkpoint,
    LoopState,
    load_checkpoint,
    restore_strategy,
    save_checkpoint,
    strategy_state,
)
from server.progress import Progress, duration
from server.samples import HEADER, draw_tile, sample_grid, tile_size


def test_fedavgm_momentum_survives_a_checkpoint(tmp_path):
    strategy = FedAvgM(server_momentum=0.9)
    strategy.current_arrays = ArrayRecord({"w": torch.arange(4.0)})
    strategy.momentum_vector = [np.full(4, 0.25, np.float32)]
    state = LoopState(round=3, shared={"w": torch.ones(4)}, history={3: {"x": 1.0}},
                      devices={7: {"device": "device-00007"}}, exhausted=[7], panel=[7],
                      release={"released": 3}, rng=np.random.default_rng(5).bit_generator.state,
                      strategy=strategy_state(strategy))
    path = save_checkpoint(tmp_path / "last.pt", Checkpoint("r" * 32, "seed: 0\n", {}, state))
    again = load_checkpoint(path)
    fresh = FedAvgM(server_momentum=0.9)
    restore_strategy(fresh, again.loop.strategy)
    assert np.array_equal(fresh.momentum_vector[0], strategy.momentum_vector[0])
    assert torch.equal(fresh.current_arrays.to_torch_state_dict()["w"], torch.arange(4.0))
    rng = np.random.default_rng()
    rng.bit_generator.state = again.loop.rng
    assert rng.random() == np.random.default_rng(5).random()  # sampling continues the same


def test_progress_reads_well_and_estimates_the_time_left():
    assert [duration(s) for s in (4.4, 65, 3725)] == ["4s", "1m05s", "1h02m"]
    lines = []
    progress = Progress(rounds=10, write=lines.append, live=False, quiet_seconds=0)
    progress.begin(first_round=3)  # resumed after round 2
    progress.start -= 40  # two rounds took 40 s
    assert progress.timing(4) == "elapsed 40s, ~2m00s left"
    progress.round_started(5, sampled=4)
    progress.devices("trained", 3, 4)
    assert lines == ["  round 5/10: 3/4 devices trained, 0s into the round"]


def test_sample_grid_shows_a_public_identity_no_device_has():
    spec = FleetSpec(num_devices=3, image_size=32, num_public=8, clip_length=3)
    task = get_task({"name": "swap", "width": 8})
    model = task.build_model(32)
    image = sample_grid(task, task.shared_state(model), task.personal_state(model), spec,
                        steps=1, rows=2)
    tile = tile_size(32)
    assert tile == 128  # nearest neighbour, 4x: a pixel of the face is a 4x4 block
    # columns: the frame's attributes, the frame, the swap, the ground truth
    assert image.size == (4 * tile, HEADER + 2 * tile)
    # The ground-truth column is the first public identity after pretraining's
    # (an id devices, numbered 0..N-1, never have), under the clip's attributes;
    # the rows are spread over the evaluation clips (first and last frame here).
    identity = Identity.sample(spec.seed, PUBLIC_ID_OFFSET + spec.num_public)
    assert identity == synthetic_device(spec, PUBLIC_ID_OFFSET + spec.num_public, 2).identity
    _, attrs = swap_benchmark(spec, task.eval_clips)
    truth = render(identity, [a.replace(noise_sigma=0.0) for a in (attrs[0], attrs[-1])], 32)
    expected = draw_tile(SampleColumn("truth", torch.from_numpy(truth)), 1, tile)
    drawn = np.asarray(image.crop((3 * tile, HEADER + tile, 4 * tile, HEADER + 2 * tile)))
    assert np.array_equal(drawn, np.asarray(expected))
    assert np.array_equal(drawn[::4, ::4], (truth[1].transpose(1, 2, 0) * 255).round())


def test_frontier_keeps_points_no_other_beats_on_both_axes():
    points = [(1.0, 10.0), (2.0, 9.0), (2.0, 12.0), (4.0, 11.0), (8.0, 15.0),
              (float("nan"), 20.0)]
    assert frontier(points) == [(1.0, 10.0), (2.0, 12.0), (8.0, 15.0)]
    assert frontier([]) == []
    with pytest.raises(TypeError):
        frontier(None)


def test_report_labels_jobs_by_what_the_sweep_varied():
    rows = [Row(f"run{k}", f"a=1 b={k} experiment=x", "FINISHED", "q", 1.0, 0.5, 1.0, 1.0)
            for k in range(2)]
    assert short_labels(rows) == ["b=0", "b=1"]
    rows[1].overrides = rows[0].overrides
    assert short_labels(rows) == ["run0", "run1"]  # nothing varied: fall back to run ids


def test_portrait_samples_have_a_row_per_control_labelled_with_its_ground_truth():
    spec = FleetSpec(image_size=32)
    task = get_task({"name": "portrait", "width": 8})
    identity = Identity.sample(spec.seed, PUBLIC_ID_OFFSET + spec.num_public)
    controls, portraits, truth = task.sample_columns(task.build_model(32), identity, spec, 8)
    sweep = control_sweep()
    assert [label.split("\n")[0] for label in controls.labels] == [n for n, _ in sweep]
    assert controls.labels[1] == "smile\nyaw +0.0\npitch +0.0\nsmile 0.9\nlight +0.0"
    # from the neutral row, each row changes exactly one control
    neutral = sweep[0][1]
    for _, attrs in sweep[1:]:
        changed = [n for n in ("yaw", "pitch", "smile", "light_x")
                   if getattr(attrs, n) != getattr(neutral, n)]
        assert len(changed) == 1
    expected = render(identity, [a for _, a in sweep], 32)
    assert np.array_equal(truth.images.numpy(), expected)
    assert portraits.images.shape == (8, 3, 32, 32)
