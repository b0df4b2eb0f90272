"""The baseline of bench/api.py: a Quart-trio app with one route, served like a node.

    .venv/bin/python -m bench.trivial_app --port PORT [--max-lifetime S]

`GET /ping` answers `{"ok": true, "node_id": "trivial"}` (the shape of `/healthz`); `POST /echo`
reads a JSON body and answers 201 with a three-field JSON object: the shape of an order request
with none of the work (no signature, no log, no book), i.e. what Quart-trio and Hypercorn cost a
route like `POST /v1/orders` here. Hypercorn
is configured as `cluster/node.py` configures a node's API (the same `HypercornConfig`
fields: bind, `keep_alive_max_requests = 1_000_000`, no access log, error log to stderr,
everything else Hypercorn's default) and the process sets the node's GC thresholds, so the
difference between this route and `POST /v1/orders` is our request handling, signing and
replication, not the server. Prints `READY <url>` once it listens. Stops on SIGTERM/SIGINT,
when its parent is gone, or after `--max-lifetime` seconds (a runaway guard).
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

from api.sdk.codec import dumps, loads
from cluster.collector import GC_THRESHOLDS


def create_app() -> QuartTrio:
    app = QuartTrio(__name__)

    @app.get("/ping")
    async def ping() -> dict:
        return {"ok": True, "node_id": "trivial"}

    @app.post("/echo")
    async def echo() -> tuple[Response, int]:
        order = loads(await request.get_data())
        return Response(
            dumps(
                {"order_id": 1, "status": "open", "client_order_id": order.get("client_order_id")}
            ),
            content_type="application/json",
        ), 201

    return app


def hypercorn_config(host: str, port: int) -> HypercornConfig:
    """The fields `cluster/node.py` sets for a node's API port (no TLS)."""
    hconfig = HypercornConfig()
    hconfig.bind = [f"{host}:{port}"]
    hconfig.keep_alive_max_requests = 1_000_000
    hconfig.accesslog = None
    hconfig.errorlog = "-"
    return hconfig


async def _main(host: str, port: int, max_lifetime_s: float, parent: int) -> None:
    app = create_app()
    stop = trio.Event()

    async def watch() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            with trio.move_on_after(max_lifetime_s):
                async for _ in signals:
                    break
        stop.set()

    async def watch_parent() -> None:
        while os.getppid() == parent:
            await trio.sleep(0.5)
        stop.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        nursery.start_soon(watch_parent)
        binds = await nursery.start(
            lambda task_status: serve(
                app,
                hypercorn_config(host, port),
                shutdown_trigger=stop.wait,
                task_status=task_status,
            )
        )
        print(f"READY {binds[0]}", flush=True)
        await stop.wait()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-lifetime", type=float, default=600.0)
    args = parser.parse_args(argv)
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()
    trio.run(_main, args.host, args.port, args.max_lifetime, os.getppid())
    sys.exit(0)


if __name__ == "__main__":
    main()
