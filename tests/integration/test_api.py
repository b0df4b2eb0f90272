"""The trading REST API on a real 3-node cluster: keys, orders, reads, errors, redirects."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from api.sdk import (
    KEY_HEADER,
    SIG_HEADER,
    TS_HEADER,
    ApiError,
    Client,
    Credentials,
    sign,
    signed_headers,
)

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


def call(url: str, creds: Credentials | None, method: str, path: str, body=None) -> httpx.Response:
    raw = json.dumps(body).encode() if body is not None else b""
    headers = signed_headers(creds, method, path, raw) if creds else {}
    return httpx.request(method, url + path, content=raw, headers=headers, timeout=10)


def test_orders_trade_and_reads_reflect_them(make_cluster) -> None:
    cluster = make_cluster(3)
    leader = cluster.wait_for_leader()
    url = cluster.nodes[leader].config.api_url
    follower_url = next(n.config.api_url for nid, n in cluster.nodes.items() if nid != leader)
    with admin(cluster) as client:
        client.submit(
            [
                MARKET,
                {"op": "deposit", "account": "alice", "asset": "USD", "amount": 10**9, "ref": "a"},
                {"op": "deposit", "account": "bob", "asset": "BTC", "amount": 10**9, "ref": "b"},
            ]
        )
        alice, bob = client.create_key("alice"), client.create_key("bob")

    sell = call(
        url,
        bob,
        "POST",
        "/v1/orders",
        {
            "market": "BTC-USD",
            "side": "sell",
            "type": "limit",
            "price": 1000,
            "qty": 5,
            "client_order_id": "s1",
        },
    )
    assert sell.status_code == 201 and sell.json()["status"] == "resting"
    buy = call(
        url,
        alice,
        "POST",
        "/v1/orders",
        {"market": "BTC-USD", "side": "buy", "type": "limit", "price": 1000, "qty": 2},
    )
    assert buy.status_code == 201
    assert buy.json()["status"] == "filled" and buy.json()["filled_qty"] == 2
    # Alice sees her side only: not bob's balances, fills, account name or fee.
    assert "bob" not in buy.text
    assert all(e.get("account", "alice") == "alice" for e in buy.json()["events"])

    # The same client_order_id again: 409 with the first order's id, nothing traded.
    again = call(
        url,
        bob,
        "POST",
        "/v1/orders",
        {
            "market": "BTC-USD",
            "side": "sell",
            "type": "limit",
            "price": 1000,
            "qty": 5,
            "client_order_id": "s1",
        },
    )
    assert again.status_code == 409
    assert again.json()["error"] == {
        "code": "duplicate_client_order_id",
        "message": "client_order_id already used",
        "order_id": sell.json()["order_id"],
    }
    # A key acts only for its own account: alice cannot cancel bob's order.
    theft = call(url, alice, "POST", "/v1/orders/cancel", {"market": "BTC-USD", "order_id": 1})
    assert theft.status_code == 404 and theft.json()["error"]["code"] == "unknown_order"
    forged = call(url, alice, "POST", "/v1/orders", {"account": "bob", "market": "BTC-USD"})
    assert forged.status_code == 400 and forged.json()["error"]["code"] == "field_not_allowed"

    book = httpx.get(url + "/v1/markets/BTC-USD/book?depth=5").json()
    assert book["asks"] == [[1000, 3]] and book["bids"] == []
    assert httpx.get(url + "/v1/markets/BTC-USD/book?depth=abc").status_code == 400
    mine = call(url, bob, "GET", "/v1/orders").json()["orders"]
    assert [(o["order_id"], o["remaining"]) for o in mine] == [(1, 3)]
    looked_up = call(url, bob, "GET", "/v1/orders/by-client-id/s1").json()
    assert looked_up["status"] == "open" and looked_up["order_id"] == 1
    balances = call(url, alice, "GET", "/v1/accounts/me/balances").json()["balances"]
    assert {"asset": "BTC", "available": 200, "reserved": 0} in balances
    trades = httpx.get(url + "/v1/markets/BTC-USD/trades").json()["trades"]
    assert [(t["price"], t["qty"]) for t in trades] == [(1000, 2)]
    assert "maker_account" not in trades[0] and "taker_fee" not in trades[0]  # public tape

    # A batch commits in order, each order with its own outcome.
    batch = call(
        url,
        bob,
        "POST",
        "/v1/orders/batch",
        {
            "orders": [
                {"market": "BTC-USD", "side": "sell", "type": "limit", "price": 1010, "qty": 1},
                {"market": "BTC-USD", "side": "sell", "type": "limit", "price": 1011, "qty": 1},
                {"market": "BTC-USD", "side": "sell", "type": "limit", "price": 1020, "qty": 1},
            ]
        },
    )
    assert batch.status_code == 200
    assert [r["http_status"] for r in batch.json()["results"]] == [201, 400, 201]
    assert batch.json()["results"][0]["status"] == "resting"
    assert batch.json()["results"][1]["error"]["code"] == "bad_tick"

    # Followers redirect linearizable reads and writes; stale reads say what seq they reflect.
    assert httpx.get(follower_url + "/v1/markets/BTC-USD/book").status_code == 307
    stale = httpx.get(follower_url + "/v1/markets/BTC-USD/book?consistency=stale")
    assert stale.status_code == 200 and int(stale.headers["X-QB-Seq"]) >= 1
    redirected = call(follower_url, alice, "POST", "/v1/orders", {"market": "BTC-USD"})
    assert redirected.status_code == 307 and redirected.headers["X-Leader"] == url


def test_bad_requests_get_4xx_with_a_code_and_never_a_500(make_cluster) -> None:
    cluster = make_cluster(3)
    url = cluster.nodes[cluster.wait_for_leader()].config.api_url
    with admin(cluster) as client:
        client.submit([MARKET])
        key = client.create_key("carol")
    cases = [
        (call(url, None, "POST", "/v1/orders", {"market": "BTC-USD"}), 401, "unauthenticated"),
        (
            call(
                url,
                key,
                "POST",
                "/v1/orders",
                {"market": "BTC-USD", "side": "buy", "type": "limit", "price": 1001, "qty": 1},
            ),
            400,
            "bad_tick",
        ),
        (
            call(
                url,
                key,
                "POST",
                "/v1/orders",
                {"market": "NOPE", "side": "buy", "type": "limit", "price": 1000, "qty": 1},
            ),
            404,
            "unknown_market",
        ),
        (
            call(
                url,
                key,
                "POST",
                "/v1/orders",
                {"market": "BTC-USD", "side": "buy", "type": "limit", "price": 1000, "qty": 1},
            ),
            422,
            "insufficient_funds",
        ),
        (call(url, key, "POST", "/v1/markets", {}), 403, "forbidden"),
        (
            call(
                url,
                cluster.admin_credentials(),
                "POST",
                "/v1/admin/keys",
                {"account": "no spaces here", "role": "trader"},
            ),
            400,
            "bad_account",
        ),
        (httpx.get(url + "/v1/nope"), 404, "not_found"),
        (httpx.get(url + "/v1/markets/BTC-USD/book?depth=0"), 400, "bad_depth"),
    ]
    # Out of range whatever the state: refused before the log, as the log would.
    cases.append(
        (
            call(
                url,
                key,
                "POST",
                "/v1/orders",
                {"market": "BTC-USD", "side": "buy", "type": "limit", "price": 1000, "qty": 10**30},
            ),
            400,
            "bad_qty",
        )
    )
    # An integer beyond 64 bits that only the state could judge (amend looks the order up
    # first) cannot enter the log: a definite 400, and the leader lives on.
    cases.append(
        (
            call(
                url,
                key,
                "POST",
                "/v1/orders/amend",
                {"market": "BTC-USD", "order_id": 1, "qty": 10**30},
            ),
            400,
            "wrong_type",
        )
    )
    cases.append((httpx.get(url + "/healthz"), 200, None))
    # Only a key id is needed to reach the timestamp and signature checks. Header bytes are
    # read as latin-1: "\xb2" is a superscript two (isdigit() but not int()), "\xe9" an e
    # acute (hmac.compare_digest refuses non-ASCII text). Both were 500s.
    for name, value in (("X-QB-Timestamp", b"\xb2"), ("X-QB-Signature", b"\xe9" * 64)):
        hostile = {**signed_headers(key, "POST", "/v1/orders", b"{}"), name: value}
        cases.append(
            (httpx.post(url + "/v1/orders", content=b"{}", headers=hostile), 401, "unauthenticated")
        )
    raw = b"{not json"
    cases.append(
        (
            httpx.post(
                url + "/v1/orders",
                content=raw,
                headers=signed_headers(key, "POST", "/v1/orders", raw),
            ),
            400,
            "malformed_json",
        )
    )
    big = json.dumps({"market": "x" * (2 << 20)}).encode()
    cases.append(
        (
            httpx.post(
                url + "/v1/orders",
                content=big,
                headers=signed_headers(key, "POST", "/v1/orders", big),
            ),
            413,
            "request_entity_too_large",
        )
    )
    replay_body = json.dumps({"market": "BTC-USD"}).encode()
    headers = signed_headers(key, "POST", "/v1/orders/cancel-all", replay_body)
    first = httpx.post(url + "/v1/orders/cancel-all", content=replay_body, headers=headers)
    assert first.status_code == 422  # no open orders
    cases.append(
        (
            httpx.post(url + "/v1/orders/cancel-all", content=replay_body, headers=headers),
            401,
            "replayed",
        )
    )
    for response, status, code in cases:
        assert response.status_code == status, (code, response.text)
        if code is not None:
            assert response.json()["error"]["code"] == code


def test_malformed_orders_are_answered_without_entering_the_log(make_cluster) -> None:
    """A trader command the log would refuse in any state is refused by the leader itself:
    same code and status, no `seq`, and the log (cmd_index) does not move."""
    cluster = make_cluster(3)
    url = cluster.nodes[cluster.wait_for_leader()].config.api_url
    with admin(cluster) as client:
        client.submit(
            [
                MARKET,
                {
                    "op": "deposit",
                    "account": "dave",
                    "asset": "USD",
                    "amount": 10**9,
                    "ref": "dave-usd",
                },
            ]
        )
        key = client.create_key("dave")
        client.barrier()
    order = {"market": "BTC-USD", "side": "buy", "type": "limit", "price": 1000, "qty": 1}

    def cmd_index() -> int:
        return httpx.get(url + "/v1/cluster/status", timeout=10).json()["cmd_index"]

    before = cmd_index()
    cases = [
        ("/v1/orders", {**order, "price": 1001}, 400, "bad_tick"),
        ("/v1/orders", {**order, "qty": "1"}, 400, "wrong_type"),
        ("/v1/orders", {**order, "qty": 0}, 400, "bad_qty"),
        ("/v1/orders", {**order, "colour": "red"}, 400, "unknown_field"),
        ("/v1/orders", {k: v for k, v in order.items() if k != "side"}, 400, "missing_field"),
        ("/v1/orders/cancel", {"market": "BTC-USD", "order_id": 0}, 400, "bad_order_id"),
        (
            "/v1/orders/amend",
            {"market": "BTC-USD", "order_id": 1, "client_order_id": "x", "qty": 1},
            400,
            "ambiguous_order_ref",
        ),
    ]
    for path, body, status, code in cases:
        response = call(url, key, "POST", path, body)
        assert response.status_code == status, (code, response.text)
        assert response.json()["error"]["code"] == code and "seq" not in response.json()
    batch = call(url, key, "POST", "/v1/orders/batch", {"orders": [{**order, "qty": -1}, order]})
    results = batch.json()["results"]
    assert [r["http_status"] for r in results] == [400, 201], results
    assert "seq" not in results[0] and results[1]["status"] == "resting"
    assert cmd_index() == before + 1  # only the good order of the batch was logged


# No client_order_id: nothing in the exchange dedupes a second copy of it.
UNGUARDED_ORDER = json.dumps(
    {"market": "BTC-USD", "side": "buy", "type": "limit", "price": 1000, "qty": 100}
).encode()


def funded_trader(cluster, account: str):
    """A trader key for `account`, with the market created and USD deposited."""
    with admin(cluster) as client:
        client.submit(
            [
                MARKET,
                {
                    "op": "deposit",
                    "account": account,
                    "asset": "USD",
                    "amount": 10**9,
                    "ref": f"{account}-usd",
                },
            ]
        )
        return client.create_key(account)


def test_a_request_replayed_to_the_next_leader_is_refused(make_cluster) -> None:
    """The state machine keeps the signatures of the requests it applied (its replicated
    replay window) and applies no second copy: a signed order without a client_order_id,
    replayed to the next leader within the window, is not placed twice."""
    cluster = make_cluster(3)
    leader = cluster.wait_for_leader()
    key = funded_trader(cluster, "erin")
    body = UNGUARDED_ORDER
    headers = signed_headers(key, "POST", "/v1/orders", body)
    signed_at = time.monotonic()
    first = httpx.post(
        cluster.nodes[leader].config.api_url + "/v1/orders",
        content=body,
        headers=headers,
        timeout=10,
    )
    assert first.status_code == 201, first.text
    cluster.kill(leader)
    new_leader = cluster.wait_for_leader(20, exclude=(leader,))
    new_url = cluster.nodes[new_leader].config.api_url
    replay = httpx.post(new_url + "/v1/orders", content=body, headers=headers, timeout=10)
    elapsed = time.monotonic() - signed_at
    assert elapsed < 4.5, f"the failover took {elapsed:.1f} s: past the 5 s replay window"
    assert replay.status_code == 401, replay.text
    assert replay.json()["error"]["code"] == "replayed"
    with Client([new_url], key) as trader:
        assert len(trader.open_orders("BTC-USD")) == 1


def test_a_request_replayed_to_a_restarted_node_become_leader_is_refused(make_cluster) -> None:
    """The regression of issue 8: a node that restarts from its own snapshot (the dump that
    compaction wrote past the request) knew nothing of the requests in it, so a signed order
    replayed to it once it led was placed a second time. The replay window now travels in the
    snapshot: refused as replayed, placed once."""
    cluster = make_cluster(3, compaction_min_entries=20, compaction_min_time_s=0.2)
    leader = cluster.wait_for_leader()
    restarted = next(n for n in cluster.nodes if n != leader)
    key = funded_trader(cluster, "fay")
    body = UNGUARDED_ORDER
    # Stamped 4.9 s ahead (the window allows it): valid for ~9.9 s, for the restart below.
    ts = time.time_ns() // 1_000_000 + 4_900
    headers = {
        KEY_HEADER: key.key_id,
        TS_HEADER: str(ts),
        SIG_HEADER: sign(key.secret, ts, "POST", "/v1/orders", body),
    }
    first = httpx.post(
        cluster.nodes[leader].config.api_url + "/v1/orders",
        content=body,
        headers=headers,
        timeout=10,
    )
    assert first.status_code == 201, first.text
    placed_at = cluster.status(leader)["commit_index"]
    with admin(cluster) as client:  # enough entries for every node to compact past the order
        deadline = time.monotonic() + 20
        while cluster.status(restarted)["raft"]["log_first_index"] <= placed_at:
            assert time.monotonic() < deadline, "the node never compacted past the order"
            client.submit(
                [
                    {
                        "op": "deposit",
                        "account": "filler",
                        "asset": "USD",
                        "amount": 1,
                        "ref": f"f{time.monotonic_ns()}-{i}",
                    }
                    for i in range(5)
                ]
            )
    cluster.stop(restarted)
    cluster.start(restarted)
    cluster.wait_converged(20)
    assert cluster.transfer_leadership(to=restarted) == restarted
    replay = httpx.post(
        cluster.nodes[restarted].config.api_url + "/v1/orders",
        content=body,
        headers=headers,
        timeout=10,
    )
    late_ms = time.time_ns() // 1_000_000 - ts
    assert late_ms < 4_900, f"the restart took too long: the replay came {late_ms} ms late"
    assert replay.status_code == 401, f"placed twice: {replay.text}"
    assert replay.json()["error"]["code"] == "replayed"
    with Client([cluster.nodes[restarted].config.api_url], key) as trader:
        assert len(trader.open_orders("BTC-USD")) == 1


def test_deposit_addresses_are_replicated_and_an_address_is_one_accounts(make_cluster) -> None:
    """Issue 13: the chain watcher credits what is sent to an address to the account every node
    has for it. Assigned through the leader; a repeat answers unchanged (a retry is safe);
    another account asking for it is refused, changing nothing; every node lists it, after a
    restart from its snapshot too."""
    cluster = make_cluster(3, compaction_min_entries=5, compaction_min_time_s=0.2)
    address = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
    with admin(cluster) as client:
        assert client.assign_deposit_address("alice", 31337, address) == "assigned"
        assert client.assign_deposit_address("alice", 31337, address.lower()) == "unchanged"
        with pytest.raises(ApiError) as taken:
            client.assign_deposit_address("bob", 31337, address)
        assert (taken.value.status, taken.value.code) == (409, "address_taken")
        assert client.assign_deposit_address("bob", 1, address) == "assigned"  # another chain
        for bad, code in [({"chain_id": 0}, "bad_chain_id"), ({"address": "0x12"}, "bad_address")]:
            body = {"account": "carol", "chain_id": 5, "address": address, **bad}
            with pytest.raises(ApiError) as refused:
                client._run(client._core.command("/v1/admin/deposit-addresses", body))
            assert (refused.value.status, refused.value.code) == (400, code)
        expected = [
            {"chain_id": 1, "address": address.lower(), "account": "bob"},
            {"chain_id": 31337, "address": address.lower(), "account": "alice"},
        ]
        cluster.wait_converged(20)
        for node in cluster.nodes.values():
            assert client.deposit_addresses(node.config.api_url) == expected
            assert client.deposit_addresses(node.config.api_url, 1) == expected[:1]
        for i in range(10):  # past the compaction threshold: the addresses are in the dumps
            client.submit([{"op": "deposit", "account": "x", "asset": "USD", "amount": 1,
                            "ref": f"fill-{i}"}])  # fmt: skip
        restarted = next(n for n in cluster.nodes if n != cluster.wait_for_leader())
        deadline = time.monotonic() + 20
        while cluster.status(restarted)["raft"]["log_first_index"] <= 4:  # compacted past them
            assert time.monotonic() < deadline, "the node never compacted past the addresses"
            time.sleep(0.05)
        cluster.stop(restarted)
        cluster.start(restarted)
        cluster.wait_converged(20)
        assert client.deposit_addresses(cluster.nodes[restarted].config.api_url) == expected
