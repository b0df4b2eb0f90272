"""Operations routes in process, against a stand-in node: `/readyz`, `/metrics` and the
per-key rate limits (an injected clock: no sleeping)."""

from __future__ import annotations

import json
import time

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from api import ws
from api.app import create_app
from api.auth import (
    KEY_HEADER,
    SIG_HEADER,
    TS_HEADER,
    Credentials,
    Verifier,
    new_credentials,
    sign,
)
from api.rate_limit import RateLimiter, RateLimits


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class StandInNode:
    """A follower that redirects every signed route; its figures are set by the test."""

    node_id = "n2"

    def __init__(self, **health: object) -> None:
        self.figures = {
            "node_id": "n2",
            "role": "follower",
            "leader": "n1",
            "leader_connected": True,
            "term": 3,
            "commit_index": 40,
            "applied_index": 40,
            "cmd_index": 17,
            **health,
        }

    def is_leader(self) -> bool:
        return False

    def leader_url(self) -> str | None:
        return "http://127.0.0.1:9001"

    def health(self) -> dict:
        return dict(self.figures)

    def applied_seq(self) -> int:  # the WebSocket's seq look-ups
        return 5

    def histograms(self) -> dict:
        return {
            "qb_commit_latency_seconds": {
                "buckets": [[0.001, 2], [0.01, 5]],
                "sum": 0.02,
                "count": 6,
            },
            "qb_batch_size_entries": {"buckets": [[1, 4], [10, 6]], "sum": 30.0, "count": 6},
        }


class Caller:
    """Requests against one app, in one trio run per call."""

    def __init__(
        self, node: StandInNode, known: list[Credentials], limiter: RateLimiter | None = None
    ) -> None:
        self.app = create_app(node, Verifier(known), limiter=limiter)
        self._last_ts = 0

    def get(self, path: str, signer: Credentials | None = None) -> tuple[int, bytes, dict]:
        headers = {}
        if signer is not None:
            # Two identical GETs in one millisecond would sign alike: a replay (401).
            ts = self._last_ts = max(time.time_ns() // 1_000_000, self._last_ts + 1)
            headers = {
                KEY_HEADER: signer.key_id,
                TS_HEADER: str(ts),
                SIG_HEADER: sign(signer.secret, ts, "GET", path, b""),
            }

        async def go():
            client = self.app.test_client()
            response = await client.get(path, headers=headers)
            return response.status_code, await response.get_data(), response.headers

        return trio.run(go)


def metric_samples(text: bytes) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


# ---------------------------------------------------------------------- /readyz


def test_ready_when_a_leader_is_known_and_the_applied_index_keeps_up() -> None:
    status, body, _ = Caller(StandInNode(commit_index=140, applied_index=40), []).get("/readyz")
    assert status == 200
    assert json.loads(body) == {
        "ready": True,
        "node_id": "n2",
        "role": "follower",
        "leader": "n1",
        "lag_entries": 100,
    }


def test_not_ready_without_a_leader() -> None:
    node = StandInNode(role="candidate", leader=None)
    status, body, headers = Caller(node, []).get("/readyz")
    assert (status, headers["Retry-After"]) == (503, "1")
    error = json.loads(body)["error"]
    assert error["code"] == "not_ready"
    assert error["message"] == "no leader known (role candidate, term 3)"


def test_not_ready_when_the_known_leader_is_out_of_reach() -> None:
    status, body, _ = Caller(StandInNode(leader_connected=False), []).get("/readyz")
    assert status == 503
    assert json.loads(body)["error"]["message"] == "no link to the leader n1 (term 3)"


def test_not_ready_while_applying_falls_behind_the_commit_index() -> None:
    status, body, _ = Caller(StandInNode(commit_index=141, applied_index=40), []).get("/readyz")
    assert status == 503
    assert json.loads(body)["error"]["message"] == (
        "applied index 40 is 101 entries behind commit index 141 (at most 100)"
    )


def test_healthz_stays_a_liveness_check() -> None:
    status, body, _ = Caller(StandInNode(leader=None), []).get("/healthz")
    assert (status, json.loads(body)) == (200, {"ok": True, "node_id": "n2"})


# ---------------------------------------------------------------------- /metrics


def test_metrics_show_node_figures_and_requests_by_route_template() -> None:
    trader = new_credentials("trader", "alice")
    caller = Caller(StandInNode(), [trader])
    assert caller.get("/v1/orders/7", trader)[0] == 307
    assert caller.get("/v1/orders/8", trader)[0] == 307
    assert caller.get("/no/such/route")[0] == 404
    status, text, headers = caller.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = metric_samples(text)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    # Two raw paths, one series: the label is the url rule.
    assert (
        value(
            "qb_http_requests_total", route="/v1/orders/<int:order_id>", method="GET", status="307"
        )
        == 2
    )
    assert value("qb_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert (
        value(
            "qb_http_request_duration_seconds_count",
            route="/v1/orders/<int:order_id>",
            method="GET",
        )
        == 2
    )
    assert not any("/v1/orders/7" in str(key) for key in samples)
    assert value("qb_raft_role", role="follower") == 1
    assert value("qb_raft_role", role="leader") == 0
    assert value("qb_raft_leader_known") == 1
    assert (
        value("qb_raft_term"),
        value("qb_raft_commit_index"),
        value("qb_raft_applied_index"),
        value("qb_cmd_index"),
    ) == (3, 40, 40, 17)
    assert not any(name.startswith("qb_raft_journal") for name, _labels in samples)  # none given
    assert value("qb_commit_latency_seconds_bucket", le="0.001") == 2
    assert value("qb_commit_latency_seconds_bucket", le="+Inf") == 6
    assert value("qb_commit_latency_seconds_sum") == 0.02
    assert value("qb_batch_size_entries_bucket", le="10.0") == 6
    assert value("qb_batch_size_entries_count") == 6


def test_metrics_show_the_journal_and_its_log_hold() -> None:
    log = {"log_first_index": 31, "journal_bytes": 52_000, "dump_index": 30,
           "compaction_hold": 12, "compaction_holds_released": 1}  # fmt: skip
    samples = metric_samples(Caller(StandInNode(log=log), []).get("/metrics")[1])
    assert {
        name: samples[(name, ())]
        for name in (
            "qb_raft_log_first_index",
            "qb_raft_journal_bytes",
            "qb_raft_dump_index",
            "qb_raft_compaction_hold",
            "qb_raft_compaction_holds_released_total",
        )
    } == {
        "qb_raft_log_first_index": 31,
        "qb_raft_journal_bytes": 52_000,
        "qb_raft_dump_index": 30,
        "qb_raft_compaction_hold": 12,
        "qb_raft_compaction_holds_released_total": 1,
    }
    no_hold = metric_samples(
        Caller(StandInNode(log={**log, "compaction_hold": None}), []).get("/metrics")[1]
    )
    assert ("qb_raft_compaction_hold", ()) not in no_hold
    assert no_hold[("qb_raft_journal_bytes", ())] == 52_000


def test_every_app_has_its_own_registry() -> None:
    trader = new_credentials("trader", "alice")
    first, second = Caller(StandInNode(), [trader]), Caller(StandInNode(), [trader])
    first.get("/v1/orders/7", trader)
    key = (
        "qb_http_requests_total",
        (("method", "GET"), ("route", "/v1/orders/<int:order_id>"), ("status", "307")),
    )
    assert metric_samples(first.get("/metrics")[1])[key] == 1
    assert key not in metric_samples(second.get("/metrics")[1])


# ---------------------------------------------------------------------- rate limits


def test_a_key_over_its_limit_gets_429_with_retry_after_then_recovers() -> None:
    clock = FakeClock()
    alice, bob = new_credentials("trader", "alice"), new_credentials("trader", "bob")
    caller = Caller(
        StandInNode(), [alice, bob], RateLimiter(RateLimits(per_s=0.5, burst=2), clock=clock)
    )
    assert [caller.get("/v1/orders/1", alice)[0] for _ in range(2)] == [307, 307]
    status, body, headers = caller.get("/v1/orders/1", alice)
    assert (status, headers["Retry-After"]) == (429, "2")  # one token per 2 s
    assert json.loads(body)["error"]["code"] == "rate_limited"
    assert json.loads(body)["error"]["retry_after_s"] == 2
    assert caller.get("/v1/orders/1", bob)[0] == 307  # buckets are per key
    clock.now += 1.0  # half a token: the wait is rounded up to whole seconds
    status, _, headers = caller.get("/v1/orders/1", alice)
    assert (status, headers["Retry-After"]) == (429, "1")
    clock.now += 1.0
    assert caller.get("/v1/orders/1", alice)[0] == 307
    samples = metric_samples(caller.get("/metrics")[1])
    assert samples[("qb_rate_limited_total", (("role", "trader"),))] == 2


def test_unauthenticated_requests_take_no_token() -> None:
    clock = FakeClock()
    alice = new_credentials("trader", "alice")
    limiter = RateLimiter(RateLimits(per_s=1, burst=1), clock=clock)
    caller = Caller(StandInNode(), [alice], limiter)
    forged = Credentials(alice.key_id, "0" * 64, "trader", "alice")
    assert [caller.get("/v1/orders/1", forged)[0] for _ in range(3)] == [401, 401, 401]
    assert caller.get("/v1/orders/1", alice)[0] == 307


def test_the_bucket_refills_at_the_rate_up_to_the_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(per_s=10, burst=5), clock=clock)
    assert [limiter.check("k") for _ in range(6)] == [None] * 5 + [1]
    clock.now += 0.25  # 2.5 tokens
    assert [limiter.check("k") for _ in range(3)] == [None, None, 1]
    clock.now += 3600  # never more than the burst
    assert [limiter.check("k") for _ in range(6)] == [None] * 5 + [1]


def test_admin_keys_are_exempt_by_default_or_have_their_own_limit() -> None:
    clock = FakeClock()
    exempt = RateLimiter(RateLimits(per_s=1, burst=1), clock=clock)
    assert [exempt.check("a", "admin") for _ in range(1000)] == [None] * 1000
    own = RateLimiter(RateLimits(per_s=1, burst=1, admin_per_s=100, admin_burst=3), clock=clock)
    assert [own.check("a", "admin") for _ in range(4)] == [None, None, None, 1]
    assert [own.check("t") for _ in range(2)] == [None, 1]


@pytest.mark.parametrize("per_s", [0.0, -1.0])
def test_a_rate_of_zero_turns_the_limit_off(per_s: float) -> None:
    limiter = RateLimiter(RateLimits(per_s=per_s, burst=1), clock=FakeClock())
    assert {limiter.check("k") for _ in range(100)} == {None}
    assert len(limiter) == 0


def test_idle_buckets_are_evicted_and_the_count_is_bounded() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(per_s=10, burst=5, max_keys=100), clock=clock)
    for i in range(1000):
        limiter.check(f"k{i}")
    assert len(limiter) == 100  # beyond max_keys the least recently used goes
    clock.now += 0.5  # every bucket is full again: they carry nothing, and go
    limiter.check("fresh")
    assert len(limiter) == 1
    # A bucket still refilling is kept: its key cannot get a new full burst.
    for _ in range(5):
        limiter.check("busy")
    clock.now += 0.2
    limiter.check("other")
    assert limiter.check("busy") is None and limiter.check("busy") is None
    assert limiter.check("busy") == 1


def test_websocket_order_entry_shares_the_key_bucket() -> None:
    clock = FakeClock()
    alice = new_credentials("trader", "alice")
    caller = Caller(StandInNode(), [alice], RateLimiter(RateLimits(per_s=1, burst=2), clock))
    assert caller.get("/v1/orders/1", alice)[0] == 307  # one token through REST

    async def go() -> list[dict]:
        async with caller.app.test_client().websocket("/v1/ws") as ws:
            hello = json.loads(await ws.receive())  # the connection's challenge
            ts = time.time_ns() // 1_000_000  # the signature window is wall-clock time
            await ws.send(
                json.dumps(
                    {
                        "op": "auth",
                        "key_id": alice.key_id,
                        "timestamp": ts,
                        "signature": sign(
                            alice.secret, ts, "WS", "/v1/ws", hello["nonce"].encode()
                        ),
                    }
                )
            )
            replies = [json.loads(await ws.receive())]
            for i in range(2):
                await ws.send(json.dumps({"op": "place", "request_id": i, **ORDER}))
                replies.append(json.loads(await ws.receive()))
            return replies

    auth, first, second = trio.run(go)
    assert auth["type"] == "authenticated"
    assert (first["http_status"], first["error"]["code"]) == (307, "not_leader")
    assert (second["http_status"], second["error"]["code"]) == (429, "rate_limited")
    assert second["error"]["retry_after_s"] == 1


ORDER = {"market": "BTC-USD", "side": "buy", "type": "limit", "qty": 1, "price": 5}


class BrokenNode(StandInNode):
    def applied_seq(self) -> int:
        raise RuntimeError("the node's figures are gone")


def test_a_websocket_client_that_leaves_ends_its_connection_quietly_and_a_failure_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """/v1/ws is served on ASGI directly (api/ws.py): a client that goes away ends its
    connection's tasks without an error; a connection that fails is logged, and the other
    routes still go to the Quart app."""

    async def visit(app) -> list[dict]:
        async with app.test_client().websocket("/v1/ws") as ws:
            hello = json.loads(await ws.receive())
            await ws.send(json.dumps({"op": "ping", "request_id": 7}))
            return [hello, json.loads(await ws.receive())]

    hello, pong = trio.run(visit, Caller(StandInNode(), []).app)
    assert (hello["type"], hello["seq"], pong["type"], pong["request_id"]) == (
        "hello",
        5,
        "pong",
        7,
    )
    assert [r for r in caplog.records if r.name == "api.ws"] == []

    async def broken(app) -> None:
        async with app.test_client().websocket("/v1/ws"):
            pass

    trio.run(broken, Caller(BrokenNode(), []).app)
    [failed] = [r for r in caplog.records if r.name == "api.ws"]
    assert failed.getMessage() == "WebSocket connection failed"
    [error] = failed.exc_info[1].exceptions
    assert str(error) == "the node's figures are gone"
    assert Caller(BrokenNode(), []).get("/healthz")[0] == 200


def test_a_websocket_the_server_closes_waits_for_the_client_s_close_frame() -> None:
    """The closing handshake (RFC 6455, 7.1.1): after its close frame the server keeps the
    connection until the client answers (its disconnect), and at most `CLOSE_WAIT_S`; ending
    at once dropped the TCP connection under the client's answer."""
    app = create_app(StandInNode(), Verifier([]), ws_settings=ws.Settings(error_budget=1))
    scope = {"type": "websocket", "path": "/v1/ws", "query_string": b"", "headers": [],
             "subprotocols": [], "asgi": {"version": "3.0"}}  # fmt: skip

    async def session(answer: bool) -> tuple[list[dict], float, float]:
        to_app, from_client = trio.open_memory_channel(10)
        sent: list[dict] = []
        closed_at = trio.Event()
        times = {}

        async def send(message: dict) -> None:
            sent.append(message)
            if message["type"] == "websocket.close":
                times["close"] = trio.current_time()
                closed_at.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(app, scope, from_client.receive, send)
            await to_app.send({"type": "websocket.connect"})
            for _ in range(2):  # over the error budget of 1: the server closes
                await to_app.send({"type": "websocket.receive", "bytes": b"\x00"})
            await closed_at.wait()
            if answer:
                await trio.sleep(1)
                await to_app.send({"type": "websocket.disconnect", "code": 1000})
        return sent, times["close"], trio.current_time()

    clock = trio.testing.MockClock(autojump_threshold=0)
    sent, closed, ended = trio.run(session, True, clock=clock)
    assert [m["type"] for m in sent][-1] == "websocket.close"
    assert sent[-1]["reason"] == "too_many_errors"
    assert ended - closed == pytest.approx(1.0)  # ended with the client's answer
    sent, closed, ended = trio.run(session, False, clock=clock)
    assert ended - closed == pytest.approx(ws.CLOSE_WAIT_S)  # no answer: dropped after the wait
