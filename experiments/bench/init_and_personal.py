"""What pretraining and a parameter-efficient personal part buy, at equal privacy.

    python -m experiments.bench init_and_personal

Both tasks on the default fleet under the default privacy (photo_user: the same
noise multipliers, sampling and rounds, so the same epsilons in every row):

* pretrained (default): public pretraining, devices train the personal
  embedding and the decoder head;
* no pretraining: ``pretrain.steps=0`` (random shared weights);
* fine-tune everything: devices train every shared weight (and send it back);
* portrait + personal adapter: a per-user colour adapter on top of the default.

Each row: final task quality, quality before fine-tuning, the mean-photo
baseline, the new-user check, both epsilons, and how many shared parameters a
device trains and sends per round.
"""

from __future__ import annotations

from fl.config import compose, objective_key, task_params
from fl.tasks import get_task
from fl.tracking import keys as K
from fl.tracking.model_init import resolve_init
from server.console import last_value

VARIANTS = {
    "swap": {
        "pretrained": [],
        "no pretraining": ["pretrain.steps=0"],
        "fine-tune everything": ["task.device_trains=[encoder,decoder]"],
    },
    "portrait": {
        "pretrained": [],
        "no pretraining": ["pretrain.steps=0"],
        "fine-tune everything": ["task.device_trains=[controls,decoder]"],
        "pretrained + personal adapter": ["task.adapter=true"],
    },
}
BASELINE = {"swap": K.SWAP_PSNR_BASELINE_MEAN, "portrait": K.PORTRAIT_PSNR_BASELINE_MEAN}


def _sizes(cfg) -> tuple[int, int]:
    task = get_task(task_params(cfg))
    model = task.build_model(cfg.data.image_size)
    sent = sum(p.numel() for n, p in model.named_parameters() if task.is_device_trained(n))
    personal = sum(p.numel() for n, p in model.named_parameters() if task.is_personal(n))
    return sent, personal


def run(tasks: tuple[str, ...] = ("swap", "portrait"), extra: list[str] | None = None) -> list[dict]:
    from server.simulation import simulate

    rows = []
    for task in tasks:
        for variant, overrides in VARIANTS[task].items():
            cfg = compose([f"task={task}", *overrides, *(extra or [])])
            cfg.model.init = resolve_init(cfg)
            history = simulate(cfg).history
            key = objective_key(cfg)
            newuser = K.NEWUSER[get_task(task_params(cfg)).primary_metric]
            sent, personal = _sizes(cfg)
            rows.append({
                "task": task, "variant": variant,
                "psnr": last_value(history, key),
                "before_finetuning": history[0][key],
                "baseline_mean": last_value(history, BASELINE[task]),
                "newuser_psnr": last_value(history, newuser),
                "photo_eps_max": last_value(history, K.PHOTO_EPS_MAX),
                "user_eps": last_value(history, K.USER_EPS),
                "shared_params_trained": sent, "personal_params": personal,
            })
            print(rows[-1], flush=True)
    return rows
