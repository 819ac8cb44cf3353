"""Make the credentials of a deployment: a CA, the SuperLink certificate, SuperNode keys.

    python -m experiments.make_certs --out certs --hosts superlink.example.org 10.0.0.5 \\
        --devices 3

Writes ``ca.crt``/``ca.key``, ``server.pem``/``server.key`` (valid for ``--hosts`` and
for ``localhost``/``127.0.0.1``, where the fleet gateway and the operator's ``flwr``
reach the loopback-only SuperLink) and
``device-00000.key``/``.pub`` ... (OpenSSH EC keys to register with
``flwr supernode register``). See docs/deployment.md for who gets which file.
"""

from __future__ import annotations

import argparse
import sys

from fl.deploy.certs import make_ca, make_node_keys, make_server_cert

LOOPBACK = ("localhost", "127.0.0.1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.make_certs")
    parser.add_argument("--out", required=True, help="directory to write into")
    parser.add_argument("--hosts", nargs="+", default=["localhost", "127.0.0.1"],
                        help="names and addresses SuperNodes use to reach the SuperLink")
    parser.add_argument("--devices", type=int, default=3, help="SuperNode key pairs to make")
    args = parser.parse_args(argv)
    hosts = [*args.hosts, *(h for h in LOOPBACK if h not in args.hosts)]
    make_ca(args.out)
    make_server_cert(args.out, hosts)
    for i in range(args.devices):
        make_node_keys(args.out, f"device-{i:05d}")
    print(f"wrote a CA, a SuperLink certificate for {', '.join(hosts)} and "
          f"{args.devices} SuperNode key pairs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
