"""The HTTP layer in process, against a stand-in node: who answers what before any command
reaches the log (authentication, the leader redirect, body checks)."""

from __future__ import annotations

import json

import trio

from api.app import create_app
from api.auth import AuthError, Credentials, Verifier, new_credentials
from api.sdk import signed_headers


class StandInNode:
    """The few NodePort members these routes touch before submitting anything."""

    node_id = "n2"

    def __init__(self, leader: bool, leader_url: str | None = "http://127.0.0.1:9001") -> None:
        self.leader = leader
        self._leader_url = leader_url
        self.submitted: list[dict] = []

    def is_leader(self) -> bool:
        return self.leader

    def leader_url(self) -> str | None:
        return self._leader_url

    async def submit(self, command: dict, request=None) -> list[dict]:
        self.submitted.append(command)
        raise AssertionError("nothing may be submitted in these tests")


def call(
    node: StandInNode, known: list[Credentials], signer: Credentials, path: str, body: dict
) -> tuple[int, dict, dict]:
    app = create_app(node, Verifier(known))
    raw = json.dumps(body).encode()

    async def go():
        client = app.test_client()
        response = await client.post(
            path,
            data=raw,
            headers={
                **signed_headers(signer, "POST", path, raw),
                "Content-Type": "application/json",
            },
        )
        return response.status_code, json.loads(await response.get_data()), response.headers

    return trio.run(go)


ORDER = {"market": "BTC-USD", "side": "buy", "type": "limit", "qty": 100, "price": 5000}


def test_a_follower_sends_an_unknown_key_to_the_leader() -> None:
    """A key created a moment ago may not be applied on this follower yet: redirect, not 401."""
    fresh = new_credentials("trader", "alice")
    status, body, headers = call(StandInNode(leader=False), [], fresh, "/v1/orders", ORDER)
    assert status == 307, body
    assert headers["Location"] == "http://127.0.0.1:9001/v1/orders"
    assert body["error"]["code"] == "not_leader"


def test_the_leader_refuses_an_unknown_key() -> None:
    node = StandInNode(leader=True)
    status, body, _ = call(node, [], new_credentials("trader", "alice"), "/v1/orders", ORDER)
    assert (status, body["error"]) == (401, {"code": "unauthenticated", "message": "unknown key"})
    assert node.submitted == []


def test_a_follower_without_a_leader_answers_503_for_an_unknown_key() -> None:
    node = StandInNode(leader=False, leader_url=None)
    status, body, headers = call(node, [], new_credentials("trader", "alice"), "/v1/orders", ORDER)
    assert (status, body["error"]["code"], headers["Retry-After"]) == (503, "no_leader", "1")


def test_a_bad_signature_is_refused_even_on_a_follower() -> None:
    """Only an unknown key id is redirected; a known key with a wrong secret is a 401 here."""
    real = new_credentials("trader", "alice")
    forged = Credentials(real.key_id, "0" * 64, "trader", "alice")
    status, body, _ = call(StandInNode(leader=False), [real], forged, "/v1/orders", ORDER)
    assert (status, body["error"]["message"]) == (401, "bad signature")


def test_admin_routes_need_an_admin_key_and_redirect_on_a_follower() -> None:
    trader = new_credentials("trader", "alice")
    admin = new_credentials("admin")
    status, body, _ = call(StandInNode(leader=True), [trader], trader, "/v1/admin/barrier", {})
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, body, headers = call(StandInNode(leader=False), [admin], admin, "/v1/admin/barrier", {})
    assert status == 307 and headers["X-Leader"] == "http://127.0.0.1:9001"


class ReplayingLeader(StandInNode):
    """A leader whose state machine refuses every signed request as one it already applied
    (its replicated replay window), as `Node.submit` reports it."""

    def __init__(self) -> None:
        super().__init__(leader=True)
        self.requests: list = []

    def precheck(self, command: dict) -> None:
        return None

    async def submit(self, command: dict, request=None) -> list[dict]:
        self.requests.append(request)
        raise AuthError("replayed", "this request was already received (and applied)")

    async def submit_many(self, commands: list[dict], request=None) -> list[list[dict]]:
        self.requests.append(request)
        raise AuthError("replayed", "this request was already received (and applied)")


def test_a_request_the_state_machine_refuses_as_a_replay_is_a_401() -> None:
    """The replay check that holds whatever the timing is the one at apply: a write this node
    could not know was a replay goes to the log, and its refusal there is a 401 (single
    orders, batches, admin commands), with the request's signature and timestamp submitted."""
    trader, admin = new_credentials("trader", "alice"), new_credentials("admin")
    cases = [
        (trader, "/v1/orders", ORDER),
        (trader, "/v1/orders/batch", {"orders": [ORDER]}),
        (admin, "/v1/admin/commands", {"commands": [{"op": "cancel_all"}]}),
    ]
    for key, path, body in cases:
        node = ReplayingLeader()
        status, answer, _ = call(node, [key], key, path, body)
        assert (status, answer["error"]["code"]) == (401, "replayed"), (path, answer)
        [(signature, ts_ms)] = node.requests
        assert len(signature) == 64 and isinstance(ts_ms, int)


class RaisingLeader(StandInNode):
    """A leader whose every node call raises `error`: what each route answers for it."""

    def __init__(self, error: Exception) -> None:
        super().__init__(leader=True, leader_url="http://127.0.0.1:9001")
        self.error = error

    def precheck(self, command: dict) -> None:
        return None

    async def submit(self, command: dict, request=None) -> list[dict]:
        raise self.error

    async def submit_many(self, commands: list[dict], request=None) -> list[list[dict]]:
        raise self.error

    async def change_membership(self, *args) -> str:
        raise self.error

    async def transfer_leadership(self, node_id) -> None:
        raise self.error

    async def create_key(self, *args) -> str:
        raise self.error

    async def read_barrier(self) -> None:
        raise self.error


ADMIN_ROUTES = {
    "/v1/admin/commands": {"commands": [{"op": "deposit"}]},
    "/v1/admin/members": {"action": "add", "id": "n4", "raft_addr": "h:1", "api_url": "u"},
    "/v1/admin/transfer-leader": {},
    "/v1/admin/keys": {"account": "alice"},
    "/v1/admin/barrier": {},
}
TRADER_ROUTES = {
    "/v1/orders": ORDER,
    "/v1/orders/batch": {"orders": [ORDER]},
    "/v1/orders/cancel": {"market": "BTC-USD", "order_id": 1},
}


def outcome_cases():
    from api.port import (
        MembershipBusyError,
        NoQuorumError,
        NotConfiguredError,
        NotLeaderError,
        OutcomeUnknownError,
        OverloadedError,
        RefusedError,
    )

    return [
        (NotLeaderError("http://127.0.0.1:9003"), 307, "not_leader", "X-Leader"),
        (NotLeaderError(None), 307, "not_leader", "X-Leader"),  # the node knows a leader
        (OverloadedError("queue full"), 503, "overloaded", "Retry-After"),
        (OutcomeUnknownError("timeout"), 503, "outcome_unknown", "Retry-After"),
        (NoQuorumError("no majority"), 503, "no_quorum", "Retry-After"),
        (MembershipBusyError("busy"), 409, "membership_change_in_progress", "Retry-After"),
        (RefusedError("transfer_refused", "not caught up"), 409, "transfer_refused", None),
        (NotConfiguredError("no api_master_file"), 503, "not_configured", None),
        (AuthError("replayed", "seen"), 401, "replayed", None),
    ]


def test_every_route_answers_a_node_outcome_the_same_way() -> None:
    """One mapping (api/outcomes.py): before it, a NotLeaderError was a 409 on the members and
    transfer routes and a 307 on keys and barrier, and a node without api_master_file sent the
    caller to itself in a loop."""
    admin = new_credentials("admin")
    trader = new_credentials("trader", "alice")
    for error, status, code, header in outcome_cases():
        for routes, signer in ((ADMIN_ROUTES, admin), (TRADER_ROUTES, trader)):
            for path, body in routes.items():
                got, answer, headers = call(
                    RaisingLeader(error), [admin, trader], signer, path, body
                )
                assert (got, answer["error"]["code"]) == (status, code), (path, error)
                if header is not None:
                    assert header in headers, (path, error)
                if status == 307:
                    assert headers["Location"].endswith(path), (path, headers)


def test_a_body_that_does_not_fit_is_answered_before_the_node_is_asked() -> None:
    admin = new_credentials("admin")
    node = RaisingLeader(AssertionError("the node must not be asked"))
    for path, body, code in [
        ("/v1/admin/members", {"action": "add"}, "bad_request"),
        ("/v1/admin/transfer-leader", {"to": 5}, "bad_request"),
        ("/v1/admin/keys", {"account": "_fees"}, "bad_account"),
        ("/v1/admin/commands", {"commands": []}, "bad_request"),
        ("/v1/admin/barrier", {"x": 1}, "bad_request"),
    ]:
        got, answer, _ = call(node, [admin], admin, path, body)
        assert (got, answer["error"]["code"]) == (400, code), (path, answer)
        assert "$." in answer["error"]["message"] or "field" in answer["error"]["message"]
