"""Schemathesis against the OpenAPI document a real 3-node cluster serves: generated requests,
valid and invalid, signed with the key each operation documents; every answer must have a
documented status, headers and body, and no 5xx but the retryable 503s.

Bounded (a few examples per operation and mode, derandomized: the same run every time).
Left out: changing membership and transferring leadership, which would take the cluster
apart under the run (tests/integration/test_cluster.py covers them).
"""

from __future__ import annotations

import time
from urllib.parse import unquote, urlsplit

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.sdk import Credentials, signed_headers

from .conftest import admin

MARKET = {
    "op": "create_market",
    "market": "BTC-USD",
    "base": "BTC",
    "quote": "USD",
    "lot_size": 100,
    "tick_size": 5,
    "maker_fee_bps": 1,
    "taker_fee_bps": 2,
}
SKIPPED = {("POST", "/v1/admin/members"), ("POST", "/v1/admin/transfer-leader")}
RETRYABLE_503 = {"no_leader", "no_quorum", "outcome_unknown", "overloaded"}
EXAMPLES = 10  # per operation and generation mode


class Signer(requests.auth.AuthBase):
    """Signs the request as it will be sent: method, percent-decoded path, query, body bytes."""

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        url = urlsplit(r.path_url)
        path = unquote(url.path) + (f"?{url.query}" if url.query else "")
        body = r.body.encode() if isinstance(r.body, str) else (r.body or b"")
        r.headers.update(signed_headers(self.creds, r.method or "GET", path, body))
        return r


def only_retryable_server_errors(ctx, response, case) -> None:
    """No 5xx but a 503 that says to retry (and, for outcome_unknown, how to settle it)."""
    if response.status_code >= 500:
        code = response.json()["error"]["code"] if response.status_code == 503 else None
        assert code in RETRYABLE_503, f"{response.status_code} {response.text[:300]}"
        assert "Retry-After" in response.headers


CONFIG = SchemathesisConfig.from_dict(
    {
        # The signature headers are the Signer's: generating (or leaving out) values for them
        # would only test 401s, which tests/api/test_openapi.py does.
        "generation": {"with-security-parameters": False},
        # A request over a documented limit (maxItems of a batch) is refused with 413.
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": [400, 401, 403, 404, 405, 409, 413, 422, 429]
            }
        },
    }
)
CHECKS = [
    only_retryable_server_errors,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def fuzz(
    operation,
    mode: GenerationMode,
    url: str,
    session: requests.Session,
    auth: Signer | None,
    examples: int = EXAMPLES,
) -> set[int]:
    """Run generated cases of one operation against `url`; the statuses seen."""
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
    statuses: set[int] = set()

    strategy = operation.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE:  # the document's examples too: they get past the checks
        strategy = st.one_of(*operation.get_strategies_from_examples(), strategy)

    @given(case=strategy)
    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
    )
    def run(case) -> None:
        response = case.call(
            base_url=url, session=session, auth=auth, allow_redirects=False, timeout=10
        )
        statuses.add(response.status_code)
        case.validate_response(response, checks=checks)

    run()
    return statuses


def test_every_answer_of_a_real_cluster_is_documented(make_cluster) -> None:
    cluster = make_cluster(3)
    leader = cluster.wait_for_leader()
    url = cluster.nodes[leader].config.api_url
    follower_url = next(n.config.api_url for nid, n in cluster.nodes.items() if nid != leader)
    with admin(cluster) as client:
        client.submit(
            [
                MARKET,
                {"op": "deposit", "account": "alice", "asset": "USD", "amount": 10**9, "ref": "a"},
                {"op": "deposit", "account": "alice", "asset": "BTC", "amount": 10**9, "ref": "b"},
            ]
        )
        trader = client.create_key("alice")
    keys = {"admin": cluster.admin_credentials(), "trader": trader}

    # Any node serves the document. The requests go to the leader, and a few to a follower
    # (which answers a write or a linearizable read with its documented 307).
    schema = schemathesis.openapi.from_url(follower_url + "/v1/openapi.json", config=CONFIG)
    session = requests.Session()
    seen: dict[tuple[str, str], set[int]] = {}
    on_follower: set[int] = set()
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in SKIPPED:
            continue
        role = operation.definition.raw.get("x-qb-role")
        auth = Signer(keys[role]) if role else None
        statuses = seen.setdefault((operation.method.upper(), operation.path), set())
        takes_input = {"parameters", "requestBody"} & set(operation.definition.raw)
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if takes_input else [])
        for mode in modes:
            statuses |= fuzz(operation, mode, url, session, auth)
        on_follower |= fuzz(
            operation, GenerationMode.POSITIVE, follower_url, session, auth, examples=2
        )
    elapsed_s = time.monotonic() - started
    # Not all answers were refusals: the run got through to the state machine.
    assert 201 in seen[("POST", "/v1/orders")] and 200 in seen[("GET", "/v1/markets")], seen
    assert 307 in on_follower, on_follower
    print(
        f"schemathesis: {sum(map(len, seen.values()))} (route, status) pairs in "
        f"{elapsed_s:.1f} s: {seen}"
    )
    cluster.wait_converged()
