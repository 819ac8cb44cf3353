"""A deployed device imports only what it needs.

Flower starts a new ClientApp process for every message in a deployment, so every
module on ``clients.app``'s import path is paid once per message. Tracking,
configuration, plotting, server-side accounting and the server itself belong to
the server; they cost seconds and tens of MB on a device (measured in
``experiments/bench/import_time.py``). A fresh interpreter shows what one
``import clients.app`` brings in, so a change that puts one back on the device's
path fails here, with the chain that imports it found by ``python -X importtime``.
"""

from __future__ import annotations

import json
import subprocess
import sys

# Packages a device never needs at import time. torchmetrics (and with it
# matplotlib) and PIL are imported where a metric is computed or a photo file is
# decoded: fl.metrics, fl.data.device_data.load_files.
NOT_ON_DEVICE = ("mlflow", "hydra", "omegaconf", "matplotlib", "torchmetrics", "PIL",
                 "dp_accounting", "pandas", "sklearn", "ray", "server", "experiments",
                 "fl.tracking", "fl.config", "fl.pretrain", "fl.privacy.plan",
                 "fl.privacy.user_level", "fl.privacy.release", "fl.privacy.dp_fedavg",
                 "fl.audit", "fl.deploy", "fl.data.export")

_PROBE = """\
import json, sys
import clients.app
print(json.dumps(sorted(sys.modules)))
"""


def test_importing_the_client_app_loads_nothing_a_device_does_not_need():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    found = sorted(name for name in NOT_ON_DEVICE
                   if name in loaded or any(m.startswith(name + ".") for m in loaded))
    assert found == [], (
        f"`import clients.app` loads {found}; import them where they are used "
        "(see `python -X importtime -c 'import clients.app'` for the chain)")
