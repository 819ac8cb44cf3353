"""DP-SGD against non-private local training, per per-sample-gradient engine.

One device, its real photos: the cost of one participation (every phase, Opacus'
``make_private`` and the budget check included) with each engine of
``clients.trainer.ENGINES`` and without DP, at 32 and 64 px, for two recipes
(``RECIPES``): the default two phases (the personal part alone, then the
device-trained shared layers alone) and the one joint phase of
``local.personal_epochs=0``, whose steps all reach the shared convolutions and so
show a DP-SGD step's cost at its highest; that one also at 4 epochs, where the
per-participation costs (``make_private``, the engine's set-up) weigh 4x less
and the ratio is a step's.

Made to be stable on a shared machine: one torch thread, a warm-up participation
per mode, then ``repeats`` rounds in which every mode runs once, in turn, so a
load spike hits all modes of a round alike. Times are CPU seconds of this process
(``time.process_time``: what the participation costs, whatever else the machine
runs); wall seconds are reported beside them. A mode's ratio is the median over
rounds of (its time / the non-private time of the same round), with the range.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from clients.trainer import ENGINES, train_on_device
from fl.config import compose, fleet_spec, recipe, task_params
from fl.data.device_data import load_device_data
from fl.privacy.ledger import PhotoLedger
from fl.privacy.plan import privacy_plan
from fl.tasks import get_task

NON_PRIVATE = "non-private"
RECIPES = {"two phases (default)": [], "one joint phase": ["local.personal_epochs=0"],
           "one joint phase, 4 epochs": ["local.personal_epochs=0", "local.epochs=4"]}


def _participation(task, model, photos, rec, engine: str) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, steps) of one participation."""
    cpu, wall = time.process_time(), time.perf_counter()
    steps = train_on_device(task, model, photos, rec, PhotoLedger(), engine=engine).steps
    return time.process_time() - cpu, time.perf_counter() - wall, steps


def measure(image_size: int, repeats: int, overrides: list[str],
            recipe_name: str = "") -> list[dict]:
    cfg = compose([*overrides, f"data.image_size={image_size}"])
    task, spec = get_task(task_params(cfg)), fleet_spec(cfg)
    base = recipe(cfg, privacy_plan(cfg).photo)
    photos = task.training_tensors(load_device_data(spec, 0))
    modes = {NON_PRIVATE: (dataclasses.replace(base, photo_dp=False), ENGINES[0])}
    modes |= {engine: (dataclasses.replace(base, photo_dp=True), engine) for engine in ENGINES}
    models, failed, steps = {}, {}, {}
    for mode, (rec, engine) in modes.items():  # warm-up, and which engines run at all
        models[mode] = task.build_model(image_size)
        try:
            steps[mode] = _participation(task, models[mode], photos, rec, engine)[2]
        except Exception as err:  # noqa: BLE001 - an engine that cannot run is a result
            failed[mode] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    running = [m for m in modes if m not in failed]
    cpu = {m: [] for m in running}
    wall = {m: [] for m in running}
    for _ in range(repeats):
        for mode in running:
            rec, engine = modes[mode]
            c, w, _ = _participation(task, models[mode], photos, rec, engine)
            cpu[mode].append(c)
            wall[mode].append(w)
    rows = []
    for mode in modes:
        if mode in failed:  # same columns, so the markdown table stays aligned
            rows.append(dict.fromkeys(rows[0], float("nan"))
                        | {"recipe": recipe_name, "image_size": image_size, "mode": mode,
                           "note": failed[mode]})
            continue
        ratios = [a / b for a, b in zip(cpu[mode], cpu[NON_PRIVATE])]
        rows.append({
            "recipe": recipe_name, "image_size": image_size, "mode": mode,
            "photos": len(photos[0]),
            "steps": steps[mode], "repeats": repeats,
            "cpu_s_median": statistics.median(cpu[mode]),
            "cpu_s_min": min(cpu[mode]), "cpu_s_max": max(cpu[mode]),
            "wall_s_median": statistics.median(wall[mode]),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "note": "",
        })
    return rows


def run(repeats: int = 7, overrides: list[str] | None = None,
        sizes: tuple[int, ...] = (32, 64), threads: int = 1) -> list[dict]:
    torch.set_num_threads(threads)
    return [row for name, recipe_overrides in RECIPES.items() for size in sizes
            for row in measure(size, repeats, [*recipe_overrides, *(overrides or [])], name)]


if __name__ == "__main__":
    from experiments.bench.common import table

    print(table(run()))
