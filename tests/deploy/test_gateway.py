"""The fleet gateway passes exactly Flower's Fleet routes and refuses everything else,
including the Control and Runtime APIs and paths dressed up to look like Fleet routes.
Fast: the gateway is called as an ASGI app, its SuperLink is a mock."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from fl.deploy.gateway import REFUSED, FleetGateway, fleet_routes


def _call(app: FleetGateway, method: str, path: str, raw_path: bytes | None = None,
          query: bytes = b"", body: bytes = b"", headers=()) -> tuple[int, dict, bytes]:
    scope = {"type": "http", "method": method, "path": path,
             "raw_path": path.encode("latin-1") if raw_path is None else raw_path,
             "query_string": query, "client": ("203.0.113.7", 4242),
             "headers": [(k.encode(), v.encode()) for k, v in headers]}
    chunks = [body[:3], body[3:]]
    sent: list[dict] = []

    async def receive():
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    async def run():
        await app(scope, receive, send)
        await app.aclose()

    asyncio.run(run())
    start, out = sent[0], sent[1]
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, out["body"]


@pytest.fixture
def upstream():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"reply:" + request.content,
                              headers={"content-type": "application/protobuf",
                                       "x-flower": "yes"})

    return seen, httpx.MockTransport(handler)


def test_the_routes_are_flowers_fleet_router():
    routes = fleet_routes()
    assert {"/v1/fleet/pull-messages", "/v1/fleet/push-messages", "/v1/fleet/activate-node",
            "/v1/fleet/get-fab"} <= routes
    assert all(r.startswith("/v1/fleet/") for r in routes)


def test_a_fleet_call_is_forwarded_with_its_body_and_signed_headers(upstream):
    seen, transport = upstream
    app = FleetGateway("https://superlink.test:9091", transport=transport)
    headers = [("content-type", "application/protobuf"), ("flwr-public-key", "cHVi"),
               ("flwr-signature", "c2ln"), ("host", "evil.example"), ("connection", "close")]
    status, out, body = _call(app, "POST", "/v1/fleet/pull-messages", body=b"protobuf-bytes",
                              headers=headers)
    assert status == 200 and body == b"reply:protobuf-bytes"
    assert out["x-flower"] == "yes" and out["content-length"] == str(len(body))
    (request,) = seen
    assert str(request.url) == "https://superlink.test:9091/v1/fleet/pull-messages"
    assert request.headers["flwr-public-key"] == "cHVi"
    assert request.headers["flwr-signature"] == "c2ln"
    assert request.headers["host"] == "superlink.test:9091"  # not the caller's
    assert app.refused == []


@pytest.mark.parametrize("method,path,raw,query", [
    ("POST", "/v1/control/register-node", None, b""),   # flwr supernode register
    ("POST", "/v1/control/list-runs", None, b""),       # flwr ls
    ("POST", "/v1/control/start-run", None, b""),       # flwr run
    ("POST", "/v1/runtime/acquire-task", None, b""),    # the ServerApp's task
    ("POST", "/v1/runtime/pull-task-input", None, b""),
    ("GET", "/docs", None, b""),
    ("GET", "/v1/fleet/pull-messages", None, b""),      # a Fleet path, wrong method
    ("POST", "/v1/fleet/../control/list-runs", None, b""),
    ("POST", "/v1/fleet/pull-messages", b"/v1/fleet/pull%2Dmessages", b""),
    ("POST", "/v1/fleet/pull-messages", None, b"x=1"),
    ("POST", "//v1/control/list-runs", None, b""),
    ("POST", "/v1/fleet/", None, b""),
])
def test_everything_but_the_fleet_api_is_refused_before_the_superlink(upstream, method, path,
                                                                      raw, query):
    seen, transport = upstream
    app = FleetGateway("https://superlink.test:9091", transport=transport)
    status, _, body = _call(app, method, path, raw_path=raw, query=query)
    assert status == 404
    assert json.loads(body)["detail"].startswith(REFUSED)
    assert seen == [] and app.refused == [(method, path)]


def test_an_unreachable_superlink_is_a_502_not_a_crash():
    def handler(request):
        raise httpx.ConnectError("refused", request=request)

    app = FleetGateway("https://superlink.test:9091", transport=httpx.MockTransport(handler))
    status, _, body = _call(app, "POST", "/v1/fleet/send-node-heartbeat", body=b"x")
    assert status == 502 and "unreachable" in json.loads(body)["detail"]
