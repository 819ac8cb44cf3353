"""The fleet gateway: the only door of a deployment that devices and strangers see.

    python -m fl.deploy.gateway --host 0.0.0.0 --port 9092 --superlink localhost:9091 \\
        --ssl-certfile certs/server.pem --ssl-keyfile certs/server.key \\
        --ssl-ca-certfile certs/ca.crt

Flower 1.41's SuperLink serves its three HTTP APIs, Fleet (``/v1/fleet/*``,
SuperNodes), Control (``/v1/control/*``, the ``flwr`` CLI: register nodes, list and
start runs) and Runtime (``/v1/runtime/*``, the ServerApp's own I/O), on one
``--host``/``--port``; ``--control-api-address`` and ``--fleet-api-address`` are
deprecated and no longer split them, and without Flower Enterprise the Control API
accepts every caller (``NoOpControlAuthnPlugin``). docs/deployment.md has the
evidence. So the SuperLink is bound to the loopback interface and this gateway,
on the public interface, passes exactly Flower's Fleet routes to it: ``POST`` to a
path of Flower's own Fleet router, with no query string and no escaped characters.
Everything else gets ``404`` and a one-line reason, and is logged. Whoever steers the
deployment needs a login on the SuperLink host (or an SSH tunnel to it).

The gateway terminates TLS with the SuperLink's certificate and dials the SuperLink
over TLS, trusting the deployment's CA. SuperNode authentication is untouched: the
signed headers pass through and the SuperLink checks them.
"""

from __future__ import annotations

import argparse
import json
import logging
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import httpx

log = logging.getLogger("fedface.gateway")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

REFUSED = "refused by the fedface fleet gateway, which passes only the Fleet API"
# Flower's own limit on one message (flwr.supercore.grpc.GRPC_MAX_MESSAGE_LENGTH).
MAX_BODY = 2_147_483_647
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
                        "host", "content-length", "accept-encoding", "content-encoding"})


def fleet_routes() -> frozenset[str]:
    """The paths of Flower's Fleet router, read from the installed Flower, so the gateway
    follows it; each must lie under ``/v1/fleet/``."""
    from flwr.superlink.routers.fleet.router import router

    paths = frozenset(route.path for route in router.routes)
    outside = sorted(p for p in paths if not p.startswith("/v1/fleet/"))
    if outside or not paths:
        raise RuntimeError(f"Flower's Fleet router has paths outside /v1/fleet/: {outside}")
    return paths


class FleetGateway:
    """An ASGI app forwarding ``POST <fleet route>`` to ``upstream`` and refusing the rest."""

    def __init__(self, upstream: str, verify: ssl.SSLContext | str | bool = True,
                 routes: Iterable[str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 timeout: float = 60.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.routes = frozenset(routes) if routes is not None else fleet_routes()
        self._verify, self._transport, self._timeout = verify, transport, timeout
        self._client: httpx.AsyncClient | None = None
        self.refused: list[tuple[str, str]] = []  # (method, path), for tests and logs

    def passes(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        raw = scope.get("raw_path")
        return (scope.get("method") == "POST" and path in self.routes
                and (raw is None or raw == path.encode("ascii"))
                and not scope.get("query_string"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            if self.passes(scope):
                await self._forward(scope, receive, send)
            else:
                await self._refuse(scope, send)
        # websockets and anything else: not answered, the server closes them

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _refuse(self, scope: Scope, send: Send) -> None:
        method, path = str(scope.get("method", "?")), str(scope.get("path", "?"))[:200]
        self.refused.append((method, path))
        client = scope.get("client") or ("?", 0)
        log.warning("refused %s %r from %s:%s", method, path, client[0], client[1])
        await _respond(send, 404, {"detail": f"{REFUSED}: {method} {path} is not served here"})

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > MAX_BODY:
                await _respond(send, 413, {"detail": "fleet gateway: request body too large"})
                return
            if not message.get("more_body", False):
                break
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k.decode("latin-1").lower() not in HOP_BY_HOP]
        headers.append(("accept-encoding", "identity"))
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.upstream, verify=self._verify, transport=self._transport,
                timeout=httpx.Timeout(self._timeout, connect=10.0), follow_redirects=False,
                trust_env=False)
        try:
            reply = await self._client.post(scope["path"], content=bytes(body), headers=headers)
        except httpx.HTTPError as err:
            log.error("SuperLink unreachable for %s: %s", scope["path"], type(err).__name__)
            await _respond(send, 502, {"detail": "fleet gateway: the SuperLink is unreachable"})
            return
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.multi_items()
               if k.lower() not in HOP_BY_HOP]
        out.append((b"content-length", str(len(reply.content)).encode()))
        await send({"type": "http.response.start", "status": reply.status_code, "headers": out})
        await send({"type": "http.response.body", "body": reply.content})


async def _respond(send: Send, status: int, payload: dict[str, str]) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fl.deploy.gateway",
        description="Pass only Flower's Fleet API from the public interface to a SuperLink "
                    "bound to loopback (docs/deployment.md).")
    parser.add_argument("--host", default="0.0.0.0", help="interface devices dial")
    parser.add_argument("--port", type=int, default=9092, help="port devices dial")
    parser.add_argument("--superlink", default="localhost:9091",
                        help="the SuperLink's loopback address (its --host/--port)")
    parser.add_argument("--ssl-certfile", required=True,
                        help="certificate devices see (the SuperLink's, server.pem)")
    parser.add_argument("--ssl-keyfile", required=True, help="its private key (server.key)")
    parser.add_argument("--ssl-ca-certfile", required=True,
                        help="CA that signed the SuperLink's certificate (ca.crt)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)

    import uvicorn

    app = FleetGateway(f"https://{args.superlink}", verify=args.ssl_ca_certfile)
    log.info("fleet gateway on %s:%s passes %d Fleet routes to https://%s; nothing else",
             args.host, args.port, len(app.routes), args.superlink)
    uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=args.ssl_certfile,
                ssl_keyfile=args.ssl_keyfile, access_log=False, server_header=False,
                proxy_headers=False, lifespan="on", log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
