"""Market read routes in process, on a stand-in node holding a real Exchange: every market
name the state machine accepts can be read, including one with a "/" (`BTC/USD`)."""

from __future__ import annotations

import json
from urllib.parse import quote

import trio

from api.app import create_app
from api.auth import Verifier
from statemachine import Exchange


class StaleReader:
    """A follower without a leader: only `?consistency=stale` reads are served, from `ex`."""

    node_id = "n2"

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex

    def is_leader(self) -> bool:
        return False

    def leader_url(self) -> None:
        return None

    def read(self, query):
        return query(self.ex)

    def recent_trades(self, market: str, limit: int) -> list[dict]:
        return []


def get(app, path: str) -> tuple[int, dict]:
    async def go():
        response = await app.test_client().get(path)
        return response.status_code, json.loads(await response.get_data())

    return trio.run(go)


def test_a_market_name_with_a_slash_has_a_book_and_trades() -> None:
    ex = Exchange()
    for ts, name in enumerate(("BTC/USD", "ETH-USD"), start=1):
        created = ex.apply(
            {
                "op": "create_market",
                "ts": ts,
                "market": name,
                "base": "B",
                "quote": "USD",
                "lot_size": 1,
                "tick_size": 1,
                "maker_fee_bps": 0,
                "taker_fee_bps": 0,
            }
        )
        assert created[0]["type"] == "market_created", created
    app = create_app(StaleReader(ex), Verifier([]))
    for name in ("BTC/USD", "ETH-USD"):
        for segment in (quote(name, safe=""), name):  # as the SDK sends it, and unencoded
            status, body = get(app, f"/v1/markets/{segment}/book?consistency=stale")
            assert (status, body["market"], body["bids"]) == (200, name, []), (segment, body)
            status, body = get(app, f"/v1/markets/{segment}/trades?consistency=stale")
            assert (status, body) == (200, {"market": name, "trades": []}), (segment, body)
    status, body = get(app, "/v1/markets/BTC/EUR/book?consistency=stale")
    assert (status, body["error"]["code"]) == (404, "unknown_market")
