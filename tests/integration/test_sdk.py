"""The client SDK (api.sdk) against a real 3-node cluster: orders, reads, errors, lost
responses, trio, a leader SIGKILL mid-flow, and `quorumbook loadgen`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import httpx
import pytest
import trio

from api.sdk import ApiError, AsyncClient, Client, ClusterUnavailable, Credentials, OutcomeUnknown
from cluster.workload import DEFAULT_MARKET, plan, wait_for

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


def fund(cluster, account: str, btc: int = 10**12, usd: int = 10**12):
    """Market, deposits and a trader key for `account`."""
    with admin(cluster) as client:
        client.submit(
            [
                MARKET,
                {
                    "op": "deposit",
                    "account": account,
                    "asset": "BTC",
                    "amount": btc,
                    "ref": f"{account}-btc",
                },
                {
                    "op": "deposit",
                    "account": account,
                    "asset": "USD",
                    "amount": usd,
                    "ref": f"{account}-usd",
                },
            ]
        )
        return client.create_key(account)


class LoseResponses(httpx.BaseTransport):
    """Delivers requests to the real node but loses the next `n` successful (2xx) answers of
    matching requests: the command was applied, the client cannot know."""

    def __init__(self, path: str, replace_with_503: bool = False) -> None:
        self.inner = httpx.HTTPTransport()
        self.path = path
        self.replace_with_503 = replace_with_503
        self.n = 0
        self.lost = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if self.n and request.url.path == self.path and 200 <= response.status_code < 300:
            response.read()
            self.n -= 1
            self.lost += 1
            if self.replace_with_503:
                return httpx.Response(
                    503,
                    headers={"Retry-After": "1"},
                    json={"error": {"code": "outcome_unknown", "message": "lost in the test"}},
                )
            raise httpx.ReadError("connection lost after sending", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


def scripted(*answers):
    """A transport answering from a script; records (url, signature) of every request."""
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("X-QB-Signature")))
        answer = answers[min(len(seen), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise type(answer)(str(answer), request=request)
        return answer

    return handler, seen


def test_retry_policy_on_scripted_answers_under_asyncio_and_trio() -> None:
    """No cluster: 307 is followed, 503 outcome_unknown resent, the 409 settled by look-up."""
    creds = Credentials("k", "s", "trader", "a")

    async def place(handler) -> dict:
        async with AsyncClient(
            ["http://a", "http://b"], creds, transport=httpx.MockTransport(handler)
        ) as client:
            return await client.place("M", "buy", "limit", 1, price=5, client_order_id="c1")

    for run in (lambda f, h: asyncio.run(f(h)), trio.run):
        handler, seen = scripted(
            httpx.Response(
                307, headers={"X-Leader": "http://b"}, json={"error": {"code": "not_leader"}}
            ),
            httpx.Response(503, json={"error": {"code": "outcome_unknown", "message": ""}}),
            httpx.Response(
                409,
                json={"error": {"code": "duplicate_client_order_id", "message": "", "order_id": 9}},
            ),
            httpx.Response(200, json={"status": "open", "order_id": 9, "client_order_id": "c1"}),
        )
        assert run(place, handler) == {
            "status": "open",
            "order_id": 9,
            "client_order_id": "c1",
            "recovered": True,
        }
        assert [u for u, _ in seen] == [
            "http://a/v1/orders",
            "http://b/v1/orders",
            "http://b/v1/orders",
            "http://b/v1/orders/by-client-id/c1",
        ]
        assert len({sig for _, sig in seen}) == 4  # re-signed every time: never a replay

    # Definite versus unknown when the deadline passes.
    handler, _ = scripted(httpx.ConnectError("refused"))
    with (
        Client(["http://a"], creds, transport=httpx.MockTransport(handler), deadline_s=0.3) as c,
        pytest.raises(ClusterUnavailable) as refused,
    ):
        c.place("M", "buy", "limit", 1, price=5)
    assert not isinstance(refused.value, OutcomeUnknown)  # nothing reached a node: not applied
    handler, _ = scripted(httpx.ReadError("reset after sending"))
    with (
        Client(["http://a"], creds, transport=httpx.MockTransport(handler), deadline_s=0.3) as c,
        pytest.raises(OutcomeUnknown),
    ):
        c.place("M", "buy", "limit", 1, price=5)
    # A first-attempt 409 is the caller reusing an id: definite, with the first order's id.
    handler, _ = scripted(
        httpx.Response(
            409, json={"error": {"code": "duplicate_client_order_id", "message": "", "order_id": 4}}
        )
    )
    with (
        Client(["http://a"], creds, transport=httpx.MockTransport(handler)) as c,
        pytest.raises(ApiError) as reused,
    ):
        c.place("M", "buy", "limit", 1, price=5, client_order_id="c1")
    assert (reused.value.status, reused.value.order_id, reused.value.after_retry) == (409, 4, False)


def test_a_replayed_write_may_have_been_applied_and_is_settled_by_the_look_up() -> None:
    """No cluster. The client never signs twice alike, so `401 replayed` means another copy of
    this very attempt (duplicated on the way) reached the cluster first, and the state machine
    applies the first copy it gets: maybe applied. The re-signed resend's 409 is then settled
    by the look-up, not raised as a reused id."""
    creds = Credentials("k", "s", "trader", "a")
    handler, seen = scripted(
        httpx.Response(401, json={"error": {"code": "replayed", "message": ""}}),
        httpx.Response(
            409, json={"error": {"code": "duplicate_client_order_id", "message": "", "order_id": 9}}
        ),
        httpx.Response(200, json={"status": "open", "order_id": 9, "client_order_id": "c1"}),
    )
    with Client(["http://a"], creds, transport=httpx.MockTransport(handler)) as client:
        placed = client.place("M", "buy", "limit", 1, price=5, client_order_id="c1")
        assert placed["recovered"] is True and placed["order_id"] == 9
        assert (client.stats["replayed"], client.stats["unknown"]) == (1, 1)
    assert len({sig for _, sig in seen}) == 3


def test_sdk_places_cancels_amends_reads_and_reports_errors(make_cluster) -> None:
    cluster = make_cluster(3)
    key = fund(cluster, "alice")
    urls = cluster.api_urls()
    leader_url = cluster.nodes[cluster.wait_for_leader()].config.api_url
    # The first URL is a follower: the client must follow the 307 and remember the leader.
    follower_first = sorted(urls, key=lambda u: u == leader_url)
    with Client(follower_first, key) as client:
        placed = client.place("BTC-USD", "sell", "limit", 5, price=1000, client_order_id="s-1")
        assert placed["status"] == "resting" and placed["client_order_id"] == "s-1"
        assert client.leader == leader_url and client.stats["redirects"] == 1
        generated = client.place("BTC-USD", "sell", "limit", 1, price=1100)
        assert generated["client_order_id"].startswith("sdk-")  # every place is idempotent
        order_id = placed["order_id"]

        assert client.order(order_id)["remaining"] == 5
        assert client.order_by_client_id("s-1")["order_id"] == order_id
        assert client.order_by_client_id("never-sent")["status"] == "unknown"
        amended = client.amend("BTC-USD", order_id, price=1005, qty=4)
        assert amended["order_id"] == order_id and amended["status"] == "resting"
        assert client.order(order_id)["price"] == 1005
        book = client.book("BTC-USD", depth=5)
        assert book["asks"] == [[1005, 4], [1100, 1]]
        stale = client.book("BTC-USD", depth=5, consistency="stale")
        assert stale["seq"] <= book["seq"]
        assert client.balances()["BTC"]["reserved"] == 5 * 100
        assert [m["market"] for m in client.markets()] == ["BTC-USD"]

        # A buy crossing the ask trades; trades and the book show it.
        bought = client.place("BTC-USD", "buy", "limit", 2, price=1005, stp="none")
        assert bought["status"] == "filled" and bought["filled_qty"] == 2
        assert [(t["price"], t["qty"]) for t in client.trades("BTC-USD")] == [(1005, 2)]

        cancelled = client.cancel("BTC-USD", order_id)
        assert cancelled["events"][0]["type"] == "cancelled"
        assert [o["client_order_id"] for o in client.open_orders("BTC-USD")] == [
            generated["client_order_id"]
        ]
        client.cancel_all("BTC-USD")
        assert client.open_orders() == []

        # Definite errors: ApiError with the server's code, nothing retried.
        retries = client.stats["retries"]
        with pytest.raises(ApiError) as bad_tick:
            client.place("BTC-USD", "buy", "limit", 1, price=1001)
        assert (bad_tick.value.status, bad_tick.value.code) == (400, "bad_tick")
        assert not bad_tick.value.after_retry
        with pytest.raises(ApiError) as gone:
            client.order(order_id)
        assert (gone.value.status, gone.value.code) == (404, "unknown_order")
        with pytest.raises(ApiError) as reused:  # a first attempt reusing an id is the caller's
            client.place("BTC-USD", "sell", "limit", 1, price=2000, client_order_id="s-1")
        assert (reused.value.code, reused.value.order_id) == ("duplicate_client_order_id", order_id)
        with pytest.raises(ApiError) as unknown_market:
            client.book("NOPE-USD")
        assert unknown_market.value.code == "unknown_market"
        assert client.stats["retries"] == retries

        batch = client.place_batch(
            [
                {"market": "BTC-USD", "side": "sell", "type": "limit", "qty": 1, "price": 3000},
                {"market": "BTC-USD", "side": "sell", "type": "limit", "qty": 1, "price": 3001},
            ]
        )
        assert "error" not in batch[0] and batch[0]["status"] == "resting"
        assert batch[1]["error"]["code"] == "bad_tick"


def test_sdk_settles_lost_responses_without_trading_twice(make_cluster) -> None:
    cluster = make_cluster(3)
    key = fund(cluster, "bob")
    for replace_with_503 in (False, True):
        lossy = LoseResponses("/v1/orders", replace_with_503)
        with Client(cluster.api_urls(), key, transport=lossy) as client:
            coid = f"lost-{replace_with_503}"
            lossy.n = 1
            result = client.place("BTC-USD", "sell", "limit", 2, price=5000, client_order_id=coid)
            # Applied the first time; the resend was a duplicate, settled by the look-up.
            assert lossy.lost == 1 and result["recovered"] is True
            assert result["status"] == "open" and result["client_order_id"] == coid
            assert client.stats["recovered"] == 1 and client.stats["unknown"] == 1
            mine = [o for o in client.open_orders() if o["client_order_id"] == coid]
            assert [o["order_id"] for o in mine] == [result["order_id"]]

    lossy = LoseResponses("/v1/orders/batch")
    with Client(cluster.api_urls(), key, transport=lossy) as client:
        lossy.n = 1
        results = client.place_batch(
            [
                {
                    "market": "BTC-USD",
                    "side": "sell",
                    "type": "limit",
                    "qty": 1,
                    "price": 6000,
                    "client_order_id": f"b{i}",
                }
                for i in range(3)
            ]
        )
        assert [r["client_order_id"] for r in results] == ["b0", "b1", "b2"]
        assert all(r["recovered"] for r in results)
        assert sorted(
            o["client_order_id"]
            for o in client.open_orders()
            if o["client_order_id"].startswith("b")
        ) == ["b0", "b1", "b2"]

    # A cancel whose answer was lost: the resend finds no open order and says so, flagged.
    lossy = LoseResponses("/v1/orders/cancel")
    with Client(cluster.api_urls(), key, transport=lossy) as client:
        lossy.n = 1
        with pytest.raises(ApiError) as cancelled:
            client.cancel("BTC-USD", client_order_id="b0")
        assert cancelled.value.code == "unknown_order" and cancelled.value.after_retry
        assert client.order_by_client_id("b0")["status"] == "done"
        # Exactly what was placed is reserved: 2 + 2 lots + b1, b2 (b0 cancelled), 100 per lot.
        assert client.balances()["BTC"]["reserved"] == 6 * 100


def test_async_client_trades_under_trio(make_cluster) -> None:
    cluster = make_cluster(3)
    key = fund(cluster, "carol")

    async def main() -> list[dict]:
        async with AsyncClient(cluster.api_urls(), key) as client:
            results: list[dict] = []

            async def place(i: int) -> None:
                results.append(
                    await client.place(
                        "BTC-USD", "sell", "limit", 1, price=7000 + 5 * i, client_order_id=f"t{i}"
                    )
                )

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(place, i)
            with pytest.raises(ApiError):
                await client.place("BTC-USD", "sell", "limit", 1, price=7001)
            assert len(await client.open_orders("BTC-USD")) == 20
            assert (await client.order_by_client_id("t3"))["status"] == "open"
            return results

    results = trio.run(main)
    assert sorted(r["client_order_id"] for r in results) == sorted(f"t{i}" for i in range(20))
    assert len({r["order_id"] for r in results}) == 20


def test_sdk_keeps_trading_through_a_leader_sigkill(make_cluster) -> None:
    """No acknowledged order lost, none placed twice, and no error reaches the caller."""
    cluster = make_cluster(3)
    key = fund(cluster, "dave")
    acked: dict[str, int] = {}  # client_order_id -> order_id, as the SDK returned them
    recovered: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    client = Client(cluster.api_urls(), key, deadline_s=20)

    def trade() -> None:
        i = 0
        while not stop.is_set():
            coid = f"f{i}"
            try:
                # Distinct, never-crossing sells of one funded account: every one rests.
                result = client.place(
                    "BTC-USD", "sell", "limit", 1, price=10_000 + 5 * i, client_order_id=coid
                )
            except BaseException as exc:  # the SDK must not give up during a failover
                errors.append(exc)
                return
            acked[coid] = result["order_id"]
            if result.get("recovered"):
                recovered.append(coid)
            i += 1

    def wait_acked(n: int) -> None:
        wait_for(lambda: len(acked) >= n or errors, 30, f"{n} acknowledged", interval_s=0.01)

    thread = threading.Thread(target=trade, daemon=True)
    thread.start()
    try:
        wait_acked(60)
        old_leader = cluster.wait_for_leader()
        cluster.kill(old_leader)
        killed_at = len(acked)
        wait_acked(killed_at + 100)
    finally:
        stop.set()
        thread.join(30)
    assert not errors, f"the SDK raised during the failover: {errors!r}"
    new_leader = cluster.wait_for_leader(20, exclude=(old_leader,))
    assert client.leader == cluster.nodes[new_leader].config.api_url
    assert client.stats["retries"] >= 1  # it did have to retry (refused, reset or 307/503)

    # Linearizable reads through the new leader: each acknowledged order exactly once.
    with Client(cluster.api_urls(), key) as reader:
        open_orders = reader.open_orders("BTC-USD")
        listed = [o["client_order_id"] for o in open_orders]
        assert len(listed) == len(set(listed)), "an order was placed twice"
        assert set(listed) == set(acked), (
            f"lost: {sorted(set(acked) - set(listed))[:5]}, "
            f"never acknowledged: {sorted(set(listed) - set(acked))[:5]}"
        )
        assert {o["client_order_id"]: o["order_id"] for o in open_orders} == acked
        assert len(set(acked.values())) == len(acked)
        for coid in recovered + [f"f{killed_at + d}" for d in (-1, 0, 1)]:
            assert reader.order_by_client_id(coid)["order_id"] == acked[coid]
        # One lot of 100 base units reserved per order: no order reserved twice.
        assert reader.balances()["BTC"]["reserved"] == 100 * len(acked)
    client.close()

    # The killed node comes back, catches up, and every replica holds the same state.
    cluster.start(old_leader)
    with admin(cluster) as a:
        a.barrier()
    statuses = cluster.wait_converged(30)
    assert len({s["state_hash"] for s in statuses.values()}) == 1


def test_loadgen_runs_a_seeded_flow_and_prints_json(make_cluster) -> None:
    first = plan(11, 50, 3, 4, DEFAULT_MARKET)
    assert first == plan(11, 50, 3, 4, DEFAULT_MARKET)  # seeded: the same flow every time
    assert first != plan(12, 50, 3, 4, DEFAULT_MARKET)
    cluster = make_cluster(3)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster",
            "loadgen",
            "--cluster",
            str(cluster.manifest_path),
            "--rate",
            "50",
            "--duration",
            "3",
            "--seed",
            "11",
            "--accounts",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["planned"] == report["sent"] == 150
    assert report["acked"] > 0 and report["failed"] == 0 and report["unknown"] == 0
    assert report["acked"] == report["sent"]
    assert report["trades"] > 0
    assert (
        0
        < report["latency_ms_p50"]
        <= report["latency_ms_p90"]
        <= report["latency_ms_p99"]
        <= report["latency_ms_max"]
    )
    assert set(report["rejections"]) <= {
        "post_only_would_cross",
        "unknown_order",
        "insufficient_funds",
    }
