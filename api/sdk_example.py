"""A short, runnable tour of the client SDK against a running cluster.

    quorumbook cluster up --nodes 3 --data-dir /tmp/qb          # in one shell
    python -m api.sdk_example --cluster /tmp/qb/cluster.json     # in another

It uses the cluster's admin credentials (named in cluster.json) only to set up: a market,
a funded account and a trader key. Everything after that is what a trading bot does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import trio

from api.sdk import (
    AdminClient,
    ApiError,
    AsyncClient,
    Client,
    ClusterUnavailable,
    Gap,
    read_credentials,
)

MARKET = {
    "op": "create_market",
    "market": "EX-USD",
    "base": "EX",
    "quote": "USD",
    "lot_size": 100,
    "tick_size": 5,
    "maker_fee_bps": 1,
    "taker_fee_bps": 2,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cluster", required=True, type=Path, help="path of cluster.json")
    parser.add_argument("--account", default="example-trader")
    args = parser.parse_args()

    manifest = json.loads(args.cluster.read_text())
    urls = [node["api_url"] for node in manifest["nodes"]]

    # Set-up (an operator's job): idempotent, so the example can run again.
    with AdminClient(urls, read_credentials(Path(manifest["admin_credentials"]))) as admin:
        admin.submit(
            [MARKET]
            + [
                {
                    "op": "deposit",
                    "account": args.account,
                    "asset": asset,
                    "amount": 10**12,
                    "ref": f"example-{args.account}-{asset}",
                }
                for asset in ("EX", "USD")
            ]
        )
        key = admin.create_key(args.account)  # the secret is shown only now: keep it safe

    # Trading. The client is given every node; it finds the leader by itself.
    with Client(urls, key) as client:
        sell = client.place("EX-USD", "sell", "limit", 5, price=1000)
        print(f"placed {sell['client_order_id']} -> order {sell['order_id']} {sell['status']}")
        print(f"leader: {client.leader}")

        client.amend("EX-USD", sell["order_id"], price=995)
        print("amended to 995:", client.order(sell["order_id"])["price"])

        buy = client.place("EX-USD", "buy", "limit", 2, price=995, stp="none")
        print(
            f"buy {buy['status']}, filled {buy['filled_qty']} lots in {len(buy['trades'])} trade(s)"
        )
        print("book:", client.book("EX-USD", depth=5))

        # A definite error: nothing was applied, the code says why.
        try:
            client.place("EX-USD", "buy", "limit", 1, price=996)
        except ApiError as exc:
            print(f"rejected as expected: {exc.status} {exc.code}")

        # The outcome look-up, the same one the SDK uses to settle a retried order.
        print("look-up:", client.order_by_client_id(sell["client_order_id"])["status"])
        try:
            client.cancel("EX-USD", sell["order_id"])
            print("cancelled the rest of", sell["order_id"])
        except ApiError as exc:  # unknown_order: it had already filled or been cancelled
            print("nothing to cancel:", exc.code)
        except ClusterUnavailable as exc:  # OutcomeUnknown included: check open_orders()
            print("no answer in time:", exc)
        print("open orders:", [o["order_id"] for o in client.open_orders("EX-USD")])
        print("balances:", client.balances())

    # The same calls from async code (trio here; asyncio works too).
    async def trade_async() -> None:
        async with AsyncClient(urls, key) as aclient:
            results = []

            async def place(i: int) -> None:
                results.append(
                    await aclient.place("EX-USD", "sell", "limit", 1, price=2000 + 5 * i)
                )

            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(place, i)
            print(f"async: placed {len(results)} orders concurrently")
            await aclient.cancel_all("EX-USD")
            print("async: cancelled them all; open now:", len(await aclient.open_orders("EX-USD")))

    trio.run(trade_async)

    # A local order book kept over the WebSocket: a snapshot, then every change. It follows
    # the cluster through reconnections and gaps by itself (docs/reference/sdk.md).
    with Client(urls, key) as client, client.subscribe_book("EX-USD") as books:
        book = next(books)
        print(f"book at seq {book.seq} from {books.url}: bids {book.bids(3)} asks {book.asks(3)}")
        placed = client.place("EX-USD", "buy", "limit", 3, price=950)
        while book.seq < placed["seq"]:  # each change comes as the same Book, updated
            book = next(books)
        print(f"after our bid (seq {book.seq}): best bid {book.best_bid()}")
        client.cancel("EX-USD", placed["order_id"])

    # Trades and our own order events: in seq order, each once; a Gap says what may be missing.
    async def watch_async() -> None:
        async with AsyncClient(urls, key) as aclient, aclient.subscribe_orders() as mine:
            start = await mine.wait_subscribed()  # every event after this seq will come
            print(f"orders channel open at seq {start} on {mine.url}")
            sell = await aclient.place("EX-USD", "sell", "limit", 1, price=3000)
            async for item in mine:
                if isinstance(item, Gap):
                    print("may have missed events", item)
                    continue
                print(
                    f"orders channel: {item['type']} order {item.get('order_id')} seq {item['seq']}"
                )
                if item["type"] == "accepted" and item["order_id"] == sell["order_id"]:
                    break
            await aclient.cancel("EX-USD", sell["order_id"])

    trio.run(watch_async)


if __name__ == "__main__":
    main()
