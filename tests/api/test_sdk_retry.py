"""The SDK's one retry policy (api/sdk/retry.py) on scripted answers, no cluster: admin calls
are classified exactly as trader calls are (docs/reference/sdk.md, "Outcomes").

A lost answer after a write was sent is unknown, never "unavailable"; a 4xx is definite at
once; a 307 is followed and its leader remembered; a busy answer (`Retry-After`) is waited
out; a read is simply resent.
"""

from __future__ import annotations

import httpx
import pytest

from api.sdk import (
    AdminClient,
    ApiError,
    Client,
    ClusterUnavailable,
    Credentials,
    OutcomeUnknown,
)

ADMIN = Credentials("admin-k", "s", "admin")
TRADER = Credentials("trader-k", "s", "trader", "a")
FAST = {"deadline_s": 0.3, "backoff_s": 0.001, "backoff_max_s": 0.005}


def scripted(*answers):
    """A transport answering from a script (the last answer repeats); records (method, url,
    signature) of every request."""
    seen: list[tuple[str, str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, str(request.url), request.headers.get("X-QB-Signature")))
        answer = answers[min(len(seen), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise type(answer)(str(answer), request=request)
        return answer

    return httpx.MockTransport(handler), seen


def error(status: int, code: str, retry_after: bool = False, **headers: str) -> httpx.Response:
    if retry_after:
        headers["Retry-After"] = "1"
    return httpx.Response(status, headers=headers, json={"error": {"code": code, "message": ""}})


def ok(body: dict) -> httpx.Response:
    return httpx.Response(200, json=body)


RESULTS = {"results": [{"events": [{"type": "balance"}]}], "elapsed_ms": 1.0}
DEPOSIT = {"op": "deposit", "account": "a", "asset": "USD", "amount": 1, "ref": "r1"}


def admin(transport: httpx.MockTransport, urls=("http://a",)) -> AdminClient:
    return AdminClient(list(urls), ADMIN, transport=transport, **FAST)


def test_a_lost_answer_after_an_admin_write_was_sent_is_unknown() -> None:
    """The old admin loop called this `ClusterUnavailable`, "not applied"; it may have been."""
    transport, seen = scripted(httpx.ReadError("reset after sending"))
    with admin(transport) as client, pytest.raises(OutcomeUnknown):
        client.submit([DEPOSIT])
    assert len(seen) > 1  # resent until the deadline: the same request, re-signed each time
    assert len({sig for _, _, sig in seen}) == len(seen)

    for lost in (httpx.ReadTimeout("no answer"), error(503, "outcome_unknown", retry_after=True)):
        transport, _ = scripted(lost)
        with admin(transport) as client, pytest.raises(OutcomeUnknown):
            client.create_key("alice")


def test_nothing_sent_or_every_answer_not_applied_is_definite() -> None:
    for answer in (httpx.ConnectError("refused"), error(503, "no_leader", retry_after=True)):
        transport, seen = scripted(answer)
        with admin(transport, ["http://a", "http://b"]) as client:
            with pytest.raises(ClusterUnavailable) as raised:
                client.submit([DEPOSIT])
            assert not isinstance(raised.value, OutcomeUnknown)
        assert {url for _, url, _ in seen} == {
            "http://a/v1/admin/commands",
            "http://b/v1/admin/commands",
        }  # tried the next node


def test_a_resend_after_a_lost_answer_settles_it_and_says_so() -> None:
    transport, seen = scripted(httpx.ReadError("reset"), ok(RESULTS))
    with admin(transport) as client:
        reply = client.submit_reply([DEPOSIT])
        assert reply["after_retry"] is True and reply["results"] == RESULTS["results"]
        assert (client.stats["unknown"], client.stats["retries"]) == (1, 1)
    assert [m for m, _, _ in seen] == ["POST", "POST"]


def test_a_4xx_is_definite_at_once() -> None:
    transport, seen = scripted(error(400, "bad_account"))
    with admin(transport) as client, pytest.raises(ApiError) as raised:
        client.create_key("bad account")
    assert (raised.value.status, raised.value.code, raised.value.after_retry) == (
        400,
        "bad_account",
        False,
    )
    assert len(seen) == 1
    # After an attempt whose answer was lost, the same 4xx says an earlier one may have applied.
    transport, _ = scripted(httpx.ReadError("reset"), error(409, "transfer_refused"))
    with admin(transport) as client, pytest.raises(ApiError) as raised:
        client.transfer_leader("n2")
    assert raised.value.after_retry is True


def test_a_node_that_never_can_is_refused_at_once() -> None:
    """`503 not_configured` carries no Retry-After: no resend can change it."""
    transport, seen = scripted(error(503, "not_configured"))
    with admin(transport) as client, pytest.raises(ApiError) as raised:
        client.create_key("alice")
    assert (raised.value.status, raised.value.code) == (503, "not_configured")
    assert len(seen) == 1


def test_a_307_is_followed_and_its_leader_remembered() -> None:
    transport, seen = scripted(
        error(307, "not_leader", **{"X-Leader": "http://b"}),
        ok({"key_id": "k", "secret": "s", "role": "trader", "account": "alice"}),
    )
    with admin(transport, ["http://a", "http://b"]) as client:
        assert client.create_key("alice").account == "alice"
        assert client.leader == "http://b"
        client.create_key("alice")
    assert [url for _, url, _ in seen] == [
        "http://a/v1/admin/keys",
        "http://b/v1/admin/keys",
        "http://b/v1/admin/keys",  # straight to the leader the second time
    ]


def test_a_membership_change_waits_while_another_is_in_progress() -> None:
    busy = error(409, "membership_change_in_progress", retry_after=True)
    transport, seen = scripted(busy, busy, ok({"change": "added", "role": "leader"}))
    with admin(transport) as client:
        done = client.change_membership("add", "n4", "127.0.0.1:1", "http://d")
        assert done["change"] == "added" and "after_retry" not in done
        assert client.stats["busy"] == 2
    assert len(seen) == 3
    # Busy until the deadline: nothing was applied.
    transport, _ = scripted(busy)
    with admin(transport) as client, pytest.raises(ClusterUnavailable) as raised:
        client.change_membership("add", "n4", "127.0.0.1:1", "http://d", deadline_s=0.2)
    assert not isinstance(raised.value, OutcomeUnknown)
    assert "membership_change_in_progress" in str(raised.value)
    # A definite refusal (no Retry-After) is not waited for.
    transport, seen = scripted(error(409, "membership_change_refused"))
    with admin(transport) as client, pytest.raises(ApiError) as refused:
        client.change_membership("remove", "n1", "127.0.0.1:1", "http://a")
    assert refused.value.code == "membership_change_refused" and len(seen) == 1


def test_a_barrier_changes_nothing_so_a_lost_answer_is_not_unknown() -> None:
    transport, _ = scripted(httpx.ReadError("reset"))
    with admin(transport) as client, pytest.raises(ClusterUnavailable) as raised:
        client.barrier()
    assert not isinstance(raised.value, OutcomeUnknown)


def test_one_nodes_own_state_is_one_attempt() -> None:
    transport, seen = scripted(ok({"node_id": "n1", "role": "leader"}), httpx.ConnectError("x"))
    with admin(transport, ["http://a", "http://b"]) as client:
        assert client.statuses() == {
            "http://a": {"node_id": "n1", "role": "leader"},
            "http://b": None,
        }
        with pytest.raises(ClusterUnavailable):
            client.balances("http://b", "alice")
    assert [url for _, url, _ in seen] == [
        "http://a/v1/cluster/status",
        "http://b/v1/cluster/status",
        "http://b/v1/admin/balances?account=alice",
    ]
    assert seen[0][2] is None and seen[2][2] is not None  # status unsigned, balances signed


@pytest.mark.parametrize(
    ("script", "outcome"),
    [
        ((httpx.ReadError("reset"),), OutcomeUnknown),
        ((httpx.ConnectError("refused"),), ClusterUnavailable),
        ((error(503, "no_leader", retry_after=True),), ClusterUnavailable),
        ((error(503, "outcome_unknown", retry_after=True),), OutcomeUnknown),
        ((error(502, "bad_gateway"),), OutcomeUnknown),
        ((error(429, "rate_limited", retry_after=True),), ClusterUnavailable),
        ((error(401, "replayed"),), OutcomeUnknown),
        ((error(422, "insufficient_funds"),), ApiError),
        ((httpx.ReadError("reset"), error(404, "unknown_order")), ApiError),
    ],
)
def test_trader_and_admin_writes_share_one_classification(script, outcome) -> None:
    """The same answers end a trader write (cancel) and an admin write (submit) alike."""
    transport, _ = scripted(*script)
    trader = Client(["http://a"], TRADER, transport=transport, **FAST)
    with trader, pytest.raises(Exception) as t:
        trader.cancel("M", order_id=1)
    transport, _ = scripted(*script)
    with admin(transport) as client, pytest.raises(Exception) as a:
        client.submit([DEPOSIT])
    assert type(t.value) is type(a.value) is outcome
    if outcome is ApiError:
        assert t.value.after_retry == a.value.after_retry == (len(script) > 1)
