"""The OpenAPI document against the app itself, in process: the same routes and methods, a
valid document, served without a signature, and each operation's `security` / `x-qb-role`
and error answers are what the routes really do before anything reaches the log."""

from __future__ import annotations

import json
import re

import pytest
import trio
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

from api import openapi
from api.app import create_app
from api.auth import Verifier, new_credentials
from api.sdk import signed_headers

IGNORED_METHODS = {"HEAD", "OPTIONS"}  # Quart answers these for every route by itself
CONVERTER = re.compile(r"<(?:(?P<converter>[a-z]+):)?(?P<name>[^>]+)>")
SAMPLE_ARGS = {
    "order_id": "7",
    "client_order_id": "coid-1",
    "market": "BTC-USD",
    "account": "alice",
}


class LeaderlessFollower:
    """A follower that knows no leader: every route answers before any command is proposed."""

    node_id = "n2"

    def is_leader(self) -> bool:
        return False

    def leader_url(self) -> None:
        return None

    def health(self) -> dict:
        return {
            "node_id": self.node_id,
            "role": "follower",
            "leader": None,
            "term": 3,
            "commit_index": 10,
            "applied_index": 10,
            "cmd_index": 4,
        }

    async def status(self) -> dict:
        return {**self.health(), "state_hash": "00", "peers": []}

    def histograms(self) -> dict:
        empty = {"buckets": [], "sum": 0.0, "count": 0}
        return {"qb_commit_latency_seconds": empty, "qb_batch_size_entries": empty}

    async def submit(self, command: dict, request=None) -> list[dict]:
        raise AssertionError(f"nothing may be proposed here: {command}")

    async def submit_many(self, commands: list[dict], request=None) -> list[list[dict]]:
        raise AssertionError(f"nothing may be proposed here: {commands}")

    async def read_barrier(self) -> None:
        raise AssertionError("no read barrier on a follower")

    async def snapshot(self) -> dict:
        return {"blob": b"\x95", "applied_index": 10, "cmd_index": 4, "seq": 9,
                "state_hash": "00", "role": "follower", "cluster_id": "qb-test"}  # fmt: skip

    def read(self, query):
        raise AssertionError("a linearizable read was served by a follower")

    def deposit_addresses(self, chain_id=None) -> list:
        return [(1, "0x" + "ab" * 20, "alice")]


def app_routes(app) -> dict[str, set[str]]:
    """{OpenAPI path template: methods} of every REST route the app registers."""
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.websocket:
            continue
        path = CONVERTER.sub(lambda m: "{" + m["name"] + "}", rule.rule)
        routes.setdefault(path, set()).update(set(rule.methods) - IGNORED_METHODS)
    return routes


def documented_routes(doc: dict) -> dict[str, set[str]]:
    return {path: {method.upper() for method in item} for path, item in doc["paths"].items()}


def operations(doc: dict):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield path, method.upper(), op


def request(app, method: str, path: str, headers: dict | None = None) -> tuple[int, dict, dict]:
    async def go():
        response = await app.test_client().open(path, method=method, headers=headers or {})
        data = await response.get_data()
        if response.mimetype == "application/json":
            body = json.loads(data)
        elif response.mimetype == "application/octet-stream":  # a node snapshot
            body = data
        else:
            body = data.decode()
        return response.status_code, body, response.headers

    return trio.run(go)


def concrete(path: str) -> str:
    return re.sub(r"{(\w+)}", lambda m: SAMPLE_ARGS[m[1]], path)


def assert_documented(doc: dict, op: dict, status: int, body, headers) -> None:
    """The answer has a documented status, and its body and headers fit that response."""
    response = op["responses"].get(str(status))
    assert response is not None, f"undocumented {status}: {body}"
    ((media_type, content),) = response["content"].items()
    if media_type == "application/octet-stream":
        assert isinstance(body, bytes) and content["schema"]["format"] == "binary"
    else:
        schema = content["schema"]
        # Resolve `#/components/...` against the whole document.
        OAS31Validator({**schema, "components": doc["components"]}).validate(body)
    for name, spec in response.get("headers", {}).items():
        assert not spec["required"] or name in headers, f"{status} without {name}"


@pytest.fixture(scope="module")
def app():
    admin, trader = new_credentials("admin"), new_credentials("trader", "alice")
    return create_app(LeaderlessFollower(), Verifier([admin, trader])), admin, trader


def test_every_route_is_documented_with_its_methods(app) -> None:
    routes = app_routes(app[0])
    documented = documented_routes(openapi.document())
    assert routes == documented, {
        "undocumented": {
            p: m - documented.get(p, set())
            for p, m in routes.items()
            if m - documented.get(p, set())
        },
        "documented but not served": {
            p: m - routes.get(p, set()) for p, m in documented.items() if m - routes.get(p, set())
        },
    }


def test_path_parameters_are_the_route_arguments_with_their_types(app) -> None:
    doc = openapi.document()
    for rule in app[0].url_map.iter_rules():
        if rule.endpoint == "static" or rule.websocket:
            continue
        path = CONVERTER.sub(lambda m: "{" + m["name"] + "}", rule.rule)
        for method in set(rule.methods) - IGNORED_METHODS:
            params = {
                p["name"]: p["schema"]
                for p in doc["paths"][path][method.lower()].get("parameters", [])
                if p["in"] == "path"
            }
            assert set(params) == set(rule.arguments), (path, method)
            for m in CONVERTER.finditer(rule.rule):
                want = "integer" if m["converter"] == "int" else "string"
                assert params[m["name"]]["type"] == want, (path, m["name"])


def test_the_document_is_valid_openapi_and_served_without_a_signature(app) -> None:
    doc = openapi.document()
    validate(doc)
    assert doc["openapi"].startswith("3.")
    status, served, headers = request(app[0], "GET", openapi.PATH)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert served == doc
    assert len({op["operationId"] for _, _, op in operations(doc)}) == len(list(operations(doc)))


def test_signed_operations_are_exactly_those_that_refuse_an_unsigned_request(app) -> None:
    """Unsigned, on a follower without a leader: a signed route answers 401, a public one
    answers without asking for a key; either way with a documented status and body."""
    doc = openapi.document()
    for path, method, op in operations(doc):
        status, body, headers = request(app[0], method, concrete(path))
        if "security" in op:
            assert (status, body["error"]["code"]) == (401, "unauthenticated"), (path, method)
        else:
            assert status != 401, (path, method, body)
        if isinstance(body, dict):  # /metrics is text
            assert_documented(doc, op, status, body, headers)


def test_each_signed_operation_needs_the_key_role_it_documents(app) -> None:
    """Signed with the other role's key: 403; with its own: past the key check (on a
    leaderless follower mostly 503 no_leader), both documented."""
    _, admin, trader = app
    doc = openapi.document()
    signed = [(p, m, op) for p, m, op in operations(doc) if "security" in op]
    assert {op["x-qb-role"] for _, _, op in signed} == {"admin", "trader"}
    for path, method, op in signed:
        url = concrete(path)
        own, other = (admin, trader) if op["x-qb-role"] == "admin" else (trader, admin)
        status, body, headers = request(
            app[0], method, url, signed_headers(other, method, url, b"")
        )
        assert (status, body["error"]["code"]) == (403, "forbidden"), (path, method, body)
        assert_documented(doc, op, status, body, headers)
        if path == "/v1/admin/balances":  # the one signed route that is a stale local read
            continue
        status, body, headers = request(app[0], method, url, signed_headers(own, method, url, b""))
        assert status not in (401, 403), (path, method, body)
        assert_documented(doc, op, status, body, headers)
