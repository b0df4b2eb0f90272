"""API benchmark: orders/s and latency through a 3-node cluster's REST and WebSocket APIs.

    .venv/bin/python -m bench.api [--seconds S] [--warmup W] [--connections C]
        [--batch-connections B] [--ws-connections K] [--ws-window N] [--json]

One run, on this machine, with one client (this process, one thread per connection):

0. Set-up. A local 3-node cluster (`LocalCluster`, real node processes, journal with fsync,
   the node's batching) created with the per-key rate limit raised to `RATE_LIMIT_PER_S`
   (burst the same): the default (200/s, burst 400 per key) would make this a benchmark of
   the limiter's 429s. The limiter still runs on every request. One market, `--accounts`
   accounts funded by admin deposits, one trader key per account (`POST /v1/admin/keys`).
   Every order is a GTC limit order with a `client_order_id`: most rest a few ticks from a
   drifting mid, 12% are priced 3 ticks through it and trade. Requests go to the leader.
1. Single-order REST. `--connections` keep-alive HTTP/1.1 connections, each sending one
   signed `POST /v1/orders` at a time (a request is written only after the previous
   response was read in full: never pipelined) for `--warmup` + `--seconds`; orders/s counts
   `201` answers completed in the measured window. Baseline, same run, same client code and
   connection count: `GET /ping` on `bench/trivial_app.py`, a Quart-trio app with one route,
   served by Hypercorn in its own process with the node's Hypercorn settings. Target: ours
   >= 70% of its rate. For reading the ratio, the same app's `POST /echo` (reads a JSON order
   body, answers 201 with a small JSON object: an order route's shape without its work) is
   measured too: the framework's own cost of a route shaped like ours.
2. Idle, then latency at 50% of the peak of 1. Idle: one connection, one order at a time for
   up to `IDLE_SECONDS`: its p50 is the idle latency. Then open loop: request i is scheduled
   at `t0 + i / rate`, whichever connection is free takes the next scheduled request
   (waiting for its time if early), and latency runs from the *scheduled* time to the
   response, so a request that waited behind a slow one counts its wait (no coordinated
   omission). Target: p99 <= 3x the idle p50.
3. Batch REST. `POST /v1/orders/batch` with 100 orders each, one request in flight per
   connection, over as many connections as keep the ceiling's orders in flight (6:
   `--batch-connections` x 250, so 10 by default): a closed loop's rate is its orders in
   flight over its latency, so fewer would measure the client's concurrency, not the path.
   Orders/s counts results with `http_status` 201. Target: >= 80% of the ceiling (6).
4. WebSocket order entry. `--ws-connections` sockets on `/v1/ws`, each authenticated with its
   own trader key (`auth`), each keeping `--ws-window` `place` requests in flight (request
   ids; responses matched by id); orders/s counts `response`s with `http_status` 201.
   Target: >= 5x the single-order REST rate of 1.
5. WebSocket batch order entry: authenticated sockets each keeping 2 `place_batch` messages
   of 100 orders in flight, as many sockets as keep the ceiling's orders in flight (5 by
   default); orders/s counts orders answered 201. Target: >= 80% of the ceiling (6).
6. The cluster's commit ceiling, for reading 3-5: `--batch-connections` admin connections
   posting the same kind of orders, 250 per `POST /v1/admin/commands` (the bulk path of
   `bench/replication.py`: no per-order HTTP, auth or precheck); orders/s counts commands
   answered with their events. It runs before 3-5 (every phase leaves orders resting, and
   a deeper book costs more per command: measured last, the ceiling would be understated).

Every target is a ratio of two figures of the same run (issue 14, target 3), so that none
depends on how many cores the machine has.

Connection reuse: Hypercorn closes a keep-alive connection after `keep_alive_max_requests`
requests (its default is 1000; `cluster/node.py` sets 1,000,000, and so does the baseline),
answering the last one with `Connection: close`. The client reads that response, closes and
reopens before the next request; a connection that drops before its response is reopened
too, and that order is counted as unknown (not acknowledged, not resent). Both are counted
and printed.

The machine's cores are shared by the three nodes, the baseline app and this client: the
report prints the CPU count and the load average. Every process started here is stopped by
pid on every path (the cluster by `LocalCluster`, the baseline by `Popen.kill`), and the temp
dir is removed unless `--keep` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import wsproto
import wsproto.events as wse

from api.sdk import AdminClient, Credentials, signed_headers, ws_auth
from api.sdk.codec import dumps, loads
from bench.replication import _percentile
from cluster.launcher import LocalCluster, free_port

# Issue 14, target 3: ratios measured side by side in one run (none depends on core count).
REST_RATIO_TARGET = 0.70  # single-order REST / the trivial route's req/s
WS_RATIO_TARGET = 5.0  # WebSocket order entry (one order per message) / single-order REST
CEILING_SHARE_TARGET = 0.80  # REST batch and WebSocket place_batch / the bulk path's ceiling
LOAD_FRACTION = 0.50  # the open-loop latency phase runs at this share of single REST's peak
P99_OVER_IDLE_TARGET = 3.0  # its p99 / the idle p50 (one order at a time, one connection)
IDLE_SECONDS = 5.0
CEILING_PER_REQUEST = 250
BATCH_SIZE = 100  # the server's bound (api/trading.py MAX_BATCH_ORDERS)
WS_BATCH_WINDOW = 2  # place_batch messages in flight per socket (phase 5)
RATE_LIMIT_PER_S = 1_000_000.0  # per key; the default (200/s, burst 400) would throttle us
MARKET = "BENCH-USD"
TRIVIAL_MODULE = "bench.trivial_app"


# ---------------------------------------------------------------- a keep-alive HTTP/1.1 client


class ConnectionLost(Exception):
    """The connection ended before a whole response arrived: the outcome is unknown."""


@dataclass
class ConnStats:
    opened: int = 0
    closed_by_server: int = 0  # a response carried `Connection: close`; reopened next time
    lost: int = 0  # dropped before the response: reopened, the request not resent


class KeepAliveConnection:
    """One HTTP/1.1 connection, one request at a time (never pipelined).

    Small and fast on purpose: the same code drives the baseline and our routes, so the
    client's cost per request is the same on both sides. Responses must carry
    `Content-Length` (Hypercorn's do for these routes).
    """

    def __init__(self, url: str, stats: ConnStats, timeout_s: float = 30.0) -> None:
        parts = urlsplit(url)
        self.addr = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.host = f"{self.addr[0]}:{self.addr[1]}".encode()
        self.stats = stats
        self.timeout_s = timeout_s
        self.sock: socket.socket | None = None
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buf = b""

    def _open(self) -> socket.socket:
        sock = socket.create_connection(self.addr, timeout=self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stats.opened += 1
        self.sock = sock
        self.buf = b""
        return sock

    def request(
        self, method: bytes, path: bytes, body: bytes = b"", headers: list[tuple[bytes, bytes]] = ()
    ) -> tuple[int, bytes]:
        sock = self.sock or self._open()
        head = [method + b" " + path + b" HTTP/1.1", b"Host: " + self.host]
        if body or method == b"POST":
            head.append(b"Content-Type: application/json")
            head.append(b"Content-Length: " + str(len(body)).encode())
        head.extend(name + b": " + value for name, value in headers)
        try:
            sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
            return self._response(sock)
        except (OSError, ConnectionLost) as exc:
            self.close()
            self.stats.lost += 1
            raise ConnectionLost(str(exc) or type(exc).__name__) from None

    def _fill(self, sock: socket.socket) -> None:
        data = sock.recv(65536)
        if not data:
            raise ConnectionLost("end of stream before a whole response")
        self.buf += data

    def _response(self, sock: socket.socket) -> tuple[int, bytes]:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill(sock)
        head = self.buf[:end].split(b"\r\n")
        self.buf = self.buf[end + 4 :]
        status = int(head[0].split(b" ", 2)[1])
        length = 0
        close = False
        for line in head[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        while len(self.buf) < length:
            self._fill(sock)
        body, self.buf = self.buf[:length], self.buf[length:]
        if close:
            self.stats.closed_by_server += 1
            self.close()
        return status, body


# ---------------------------------------------------------------- the order flow


@dataclass
class Trader:
    creds: Credentials
    account: str


class OrderFlow:
    """One connection's seeded orders: GTC limits near a drifting mid, 12% crossing."""

    P_CROSS = 0.12
    MEAN_OFFSET = 10.0

    def __init__(self, name: str, seed: int) -> None:
        self.rng = random.Random(f"{seed}:{name}")
        self.name = name
        self.n = 0
        self.mid = 1_000_000

    def order(self) -> dict:
        rng = self.rng
        self.n += 1
        if rng.random() < 0.1:
            self.mid += 1 if rng.random() < 0.5 else -1
        buy = rng.random() < 0.5
        if rng.random() < self.P_CROSS:
            price = self.mid + 3 if buy else self.mid - 3
        else:
            offset = 1 + int(rng.expovariate(1.0 / self.MEAN_OFFSET))
            price = self.mid - offset if buy else self.mid + offset
        return {
            "market": MARKET,
            "side": "buy" if buy else "sell",
            "type": "limit",
            "price": price,
            "qty": 1 + int(rng.random() * 30),
            "tif": "gtc",
            "client_order_id": f"{self.name}-{self.n}",
        }


def signed(creds: Credentials, method: str, path: str, body: bytes) -> list[tuple[bytes, bytes]]:
    """The SDK's signature headers, as the raw connection sends them."""
    headers = signed_headers(creds, method, path, body)
    return [(name.encode(), value.encode()) for name, value in headers.items()]


# ---------------------------------------------------------------- closed- and open-loop drivers

# A request maker: (connection index, its connection) -> orders acknowledged (0 = not).
Sender = Callable[[int, KeepAliveConnection], int]


class Statuses:
    """Answer statuses counted from every client thread (a Counter's += is not atomic)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, key: object, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def as_dict(self) -> dict[str, int]:
        return {str(k): v for k, v in sorted(self.counts.items(), key=str)}


@dataclass
class Recorder:
    """Per phase: completions (time, latency, acknowledged), connection stats."""

    conn: ConnStats = field(default_factory=ConnStats)
    records: list[tuple[float, float, int]] = field(default_factory=list)
    unknown: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _run_threads(target: Callable[[int], None], n: int, join_s: float) -> list[str]:
    errors: list[str] = []

    def guarded(k: int) -> None:
        try:
            target(k)
        except Exception as exc:  # reported, never silently lost
            errors.append(f"connection {k}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=guarded, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_s)
    if any(t.is_alive() for t in threads):
        errors.append("a client thread did not finish in time")
    return errors


def closed_loop(
    url: str, send: Sender, *, connections: int, warmup_s: float, seconds: float
) -> dict:
    """Each connection sends its next request as soon as the previous answer is read."""
    rec = Recorder()
    t_from = time.perf_counter() + warmup_s
    t_to = t_from + seconds

    def worker(k: int) -> None:
        conn = KeepAliveConnection(url, rec.conn)
        out = []
        try:
            while (t0 := time.perf_counter()) < t_to:
                try:
                    acked = send(k, conn)
                except ConnectionLost:
                    with rec.lock:
                        rec.unknown += 1
                    continue
                t1 = time.perf_counter()
                out.append((t1, t1 - t0, acked))
        finally:
            conn.close()
            with rec.lock:
                rec.records.extend(out)

    errors = _run_threads(worker, connections, warmup_s + seconds + 60)
    return _summary(rec, t_from, t_to, seconds, errors, connections)


def open_loop(
    url: str, send: Sender, *, connections: int, rate: float, warmup_s: float, seconds: float
) -> dict:
    """Requests scheduled at `rate`; latency from the scheduled time (see the docstring)."""
    rec = Recorder()
    slots = itertools.count()
    slot_lock = threading.Lock()
    t0 = time.perf_counter() + 0.2
    t_from = t0 + warmup_s
    t_to = t_from + seconds
    late: list[float] = []

    def worker(k: int) -> None:
        conn = KeepAliveConnection(url, rec.conn)
        out = []
        try:
            while True:
                with slot_lock:
                    due = t0 + next(slots) / rate
                if due >= t_to:
                    return
                now = time.perf_counter()
                if now < due:
                    time.sleep(due - now)
                else:
                    late.append(now - due)
                try:
                    acked = send(k, conn)
                except ConnectionLost:
                    with rec.lock:
                        rec.unknown += 1
                    continue
                done = time.perf_counter()
                if due >= t_from:
                    out.append((done, done - due, acked))
        finally:
            conn.close()
            with rec.lock:
                rec.records.extend(out)

    errors = _run_threads(worker, connections, warmup_s + seconds + 60)
    result = _summary(rec, t_from, float("inf"), seconds, errors, connections)
    result["rate_target"] = rate
    result["started_late_over_1ms"] = sum(1 for x in late if x > 0.001)
    return result


def _summary(
    rec: Recorder, t_from: float, t_to: float, seconds: float, errors: list[str], connections: int
) -> dict:
    window = [r for r in rec.records if t_from <= r[0] <= t_to]
    lat = [r[1] for r in window]
    acked = sum(r[2] for r in window)
    return {
        "connections": connections,
        "seconds": seconds,
        "requests": len(window),
        "acknowledged": acked,
        "per_s": acked / seconds,
        "requests_per_s": len(window) / seconds,
        "p50_ms": _percentile(lat, 0.50) * 1000,
        "p99_ms": _percentile(lat, 0.99) * 1000,
        "max_ms": max(lat, default=float("nan")) * 1000,
        "connections_opened": rec.conn.opened,
        "closed_by_server": rec.conn.closed_by_server,
        "lost_before_response": rec.conn.lost,
        "unknown_outcome": rec.unknown,
        "errors": errors[:5],
    }


# ---------------------------------------------------------------- senders


def ping_sender(rec_statuses: Statuses) -> Sender:
    def send(k: int, conn: KeepAliveConnection) -> int:
        status, body = conn.request(b"GET", b"/ping")
        rec_statuses.add(status)
        return 1 if status == 200 and body.startswith(b"{") else 0

    return send


def flows_per_connection(tag: str, seed: int) -> Callable[[int], OrderFlow]:
    """Connection index -> its own seeded OrderFlow (own client_order_ids), made on first use."""
    flows: dict[int, OrderFlow] = {}

    def flow_for(k: int) -> OrderFlow:
        flow = flows.get(k)
        if flow is None:
            flow = flows[k] = OrderFlow(f"{tag}{k}", seed)
        return flow

    return flow_for


def signed_post(
    conn: KeepAliveConnection, creds: Credentials, path: str, payload: object
) -> tuple[int, bytes]:
    body = dumps(payload)
    return conn.request(b"POST", path.encode(), body, signed(creds, "POST", path, body))


def order_sender(traders: list[Trader], seed: int, tag: str, statuses: Statuses) -> Sender:
    flow_for = flows_per_connection(tag, seed)

    def send(k: int, conn: KeepAliveConnection) -> int:
        flow = flow_for(k)
        trader = traders[(k + flow.n * 7) % len(traders)]
        status, _ = signed_post(conn, trader.creds, "/v1/orders", flow.order())
        statuses.add(status)
        return 1 if status == 201 else 0

    return send


def echo_sender(seed: int) -> Sender:
    """`POST /echo` on the baseline app with an order body (unsigned: it checks nothing)."""
    flow_for = flows_per_connection("echo", seed)

    def send(k: int, conn: KeepAliveConnection) -> int:
        flow = flow_for(k)
        status, body = conn.request(b"POST", b"/echo", dumps(flow.order()))
        return 1 if status == 201 and body.startswith(b"{") else 0

    return send


def commands_sender(
    admin: Credentials, traders: list[Trader], seed: int, tag: str, statuses: Statuses
) -> Sender:
    """The bulk path: CEILING_PER_REQUEST place commands per `POST /v1/admin/commands`."""
    flow_for = flows_per_connection(tag, seed)

    def send(k: int, conn: KeepAliveConnection) -> int:
        flow = flow_for(k)
        commands = []
        for _ in range(CEILING_PER_REQUEST):
            trader = traders[(k + flow.n) % len(traders)]
            commands.append({"op": "place", "account": trader.account, **flow.order()})
        status, raw = signed_post(conn, admin, "/v1/admin/commands", {"commands": commands})
        if status != 200:
            statuses.add(f"request {status}")
            return 0
        committed = sum(1 for result in loads(raw)["results"] if "events" in result)
        statuses.add("committed", committed)
        return committed

    return send


def batch_sender(traders: list[Trader], seed: int, tag: str, statuses: Statuses) -> Sender:
    flow_for = flows_per_connection(tag, seed)

    def send(k: int, conn: KeepAliveConnection) -> int:
        flow = flow_for(k)
        trader = traders[(k + flow.n) % len(traders)]
        status, raw = signed_post(
            conn,
            trader.creds,
            "/v1/orders/batch",
            {"orders": [flow.order() for _ in range(BATCH_SIZE)]},
        )
        if status != 200:
            statuses.add(f"request {status}")
            return 0
        counts = Counter(result["http_status"] for result in loads(raw)["results"])
        for key, n in counts.items():
            statuses.add(key, n)
        return counts[201]

    return send


# ---------------------------------------------------------------- WebSocket order entry


def ws_phase(
    url: str,
    traders: list[Trader],
    *,
    seed: int,
    connections: int,
    window: int,
    warmup_s: float,
    seconds: float,
    per_message: int = 1,
) -> dict:
    """`window` messages in flight per socket; `per_message` > 1: `place_batch` messages of
    that many orders (acknowledged = orders answered 201)."""
    statuses: Counter = Counter()
    records: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    t_from = time.perf_counter() + warmup_s + 0.5  # + the handshake and auth
    t_to = t_from + seconds
    host, port = urlsplit(url).hostname or "127.0.0.1", urlsplit(url).port or 80

    def worker(k: int) -> None:
        trader = traders[k % len(traders)]
        flow = OrderFlow(f"ws{per_message}-{k}", seed)  # own client_order_ids per phase
        sock = socket.create_connection((host, port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        out: list[tuple[float, float, int]] = []
        local: Counter = Counter()
        try:
            sock.sendall(ws.send(wse.Request(host=f"{host}:{port}", target="/v1/ws")))
            accepted = False
            nonce = None  # the first message, hello, carries the challenge auth signs
            text = ""
            while not accepted or nonce is None:
                data = sock.recv(1 << 16)
                if not data:
                    raise RuntimeError("the node closed the WebSocket handshake")
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, wse.RejectConnection):
                        raise RuntimeError(f"WebSocket refused: {event.status_code}")
                    accepted = accepted or isinstance(event, wse.AcceptConnection)
                    if isinstance(event, wse.TextMessage):
                        text += event.data
                        if event.message_finished:
                            nonce, text = loads(text)["nonce"], ""
            pending: dict[int, float] = {}
            authed = False
            auth = dumps(ws_auth(trader.creds, nonce)).decode()
            sock.sendall(ws.send(wse.TextMessage(auth)))
            next_id = 0
            while True:
                now = time.perf_counter()
                if authed and now < t_to and len(pending) < window:
                    frames = []
                    while len(pending) < window:
                        next_id += 1
                        if per_message == 1:
                            msg = {"op": "place", "request_id": next_id, **flow.order()}
                        else:
                            msg = {
                                "op": "place_batch",
                                "request_id": next_id,
                                "orders": [flow.order() for _ in range(per_message)],
                            }
                        frames.append(ws.send(wse.TextMessage(dumps(msg).decode())))
                        pending[next_id] = now
                    sock.sendall(b"".join(frames))
                elif now >= t_to and not pending:
                    sock.sendall(ws.send(wse.CloseConnection(code=1000)))
                    return
                elif now >= t_to + 30:
                    local["no_response"] += len(pending)
                    return
                data = sock.recv(1 << 18)
                if not data:
                    local["no_response"] += len(pending)
                    return
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, wse.TextMessage):
                        text += event.data
                        if not event.message_finished:
                            continue
                        msg, text = loads(text), ""
                        kind = msg.get("type")
                        if kind == "authenticated":
                            authed = True
                        elif kind == "response":
                            t_sent = pending.pop(msg["request_id"])
                            t1 = time.perf_counter()
                            status = msg["http_status"]
                            if "results" in msg:  # place_batch: one status per order
                                codes = [r["http_status"] for r in msg["results"]]
                            else:
                                codes = [status]
                            local.update(codes)
                            out.append((t1, t1 - t_sent, codes.count(201)))
                        elif kind == "error":
                            raise RuntimeError(f"server error frame: {msg}")
                    elif isinstance(event, wse.CloseConnection):
                        local["no_response"] += len(pending)
                        return
                    elif isinstance(event, wse.Ping):
                        sock.sendall(ws.send(event.response()))
        finally:
            sock.close()
            with lock:
                records.extend(out)
                statuses.update(local)

    errors = _run_threads(worker, connections, warmup_s + seconds + 90)
    window_records = [r for r in records if t_from <= r[0] <= t_to]
    lat = [r[1] for r in window_records]
    acked = sum(r[2] for r in window_records)
    return {
        "connections": connections,
        "window": window,
        "per_message": per_message,
        "seconds": seconds,
        "acknowledged": acked,
        "per_s": acked / seconds,
        "p50_ms": _percentile(lat, 0.50) * 1000,
        "p99_ms": _percentile(lat, 0.99) * 1000,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": errors[:5],
    }


# ---------------------------------------------------------------- set-up and the baseline


def setup_cluster(cluster: LocalCluster, accounts: int) -> list[Trader]:
    urls = cluster.api_urls()
    commands: list[dict] = [
        {
            "op": "create_market",
            "market": MARKET,
            "base": "BENCH",
            "quote": "USD",
            "lot_size": 1,
            "tick_size": 1,
            "maker_fee_bps": 1,
            "taker_fee_bps": 2,
        }
    ]
    names = [f"api{i:03d}" for i in range(accounts)]
    for name in names:
        commands.append(
            {
                "op": "deposit",
                "account": name,
                "asset": "BENCH",
                "amount": 10**12,
                "ref": f"fund:{name}:base",
            }
        )
        commands.append(
            {
                "op": "deposit",
                "account": name,
                "asset": "USD",
                "amount": 10**15,
                "ref": f"fund:{name}:quote",
            }
        )
    with AdminClient(urls, cluster.admin_credentials()) as admin:
        results = admin.submit(commands)
        bad = [r for r in results if "events" not in r or r["events"][0]["type"] == "rejected"]
        if bad:
            raise SystemExit(f"cluster set-up failed: {bad[:3]}")
        return [Trader(admin.create_key(name), name) for name in names]


@contextlib.contextmanager
def trivial_app(root: Path):
    """The baseline app in its own process; yields its URL; killed by pid on every path."""
    port = free_port()
    log = root / "trivial.log"
    repo = str(Path(__file__).resolve().parent.parent)
    # -P as for the nodes (a PYTHONPATH build comes first), the checkout after it for `bench`.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), repo) if p),
    }
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-P",
                "-m",
                TRIVIAL_MODULE,
                "--port",
                str(port),
                "--max-lifetime",
                "900",
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # READY <url>, or "" if it died
        if not line.startswith("READY "):
            raise RuntimeError(f"the baseline app did not start (log {log})")
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def _load() -> float:
    return os.getloadavg()[0]


@contextlib.contextmanager
def _client_cpu(into: dict, key: str):
    """This process's CPU seconds (every client thread) per wall second of the phase."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    yield
    into[key] = {
        "client_cpu_share": (time.process_time() - cpu0) / max(1e-9, time.perf_counter() - wall0)
    }


def run(root: Path, args: argparse.Namespace) -> dict:
    res: dict = {
        "cpus": os.cpu_count(),
        "load_average_1m_before": _load(),
        "rate_limit_per_s": RATE_LIMIT_PER_S,
    }
    cluster = LocalCluster.create(
        root / "cluster",
        3,
        rate_limit_per_s=RATE_LIMIT_PER_S,
        rate_limit_burst=int(RATE_LIMIT_PER_S),
    )
    cluster.exit_with_launcher = True
    with cluster:
        cluster.start()
        leader = cluster.wait_for_leader(30)
        url = cluster.nodes[leader].config.api_url
        traders = setup_cluster(cluster, args.accounts)
        res["term_before"] = (cluster.status(leader) or {}).get("term")
        cpu: dict = {}
        phase = dict(warmup_s=args.warmup, seconds=args.seconds)

        with trivial_app(root) as trivial_url, _client_cpu(cpu, "trivial"):
            statuses = Statuses()
            res["trivial"] = closed_loop(
                trivial_url, ping_sender(statuses), connections=args.connections, **phase
            )
            res["trivial"]["statuses"] = statuses.as_dict()
            res["trivial"]["load_average_1m"] = _load()
            res["trivial_post"] = closed_loop(
                trivial_url, echo_sender(args.seed), connections=args.connections, **phase
            )

        statuses = Statuses()
        with _client_cpu(cpu, "single"):
            res["single"] = closed_loop(
                url,
                order_sender(traders, args.seed, "s", statuses),
                connections=args.connections,
                **phase,
            )
            res["single"]["statuses"] = statuses.as_dict()
            res["single"]["load_average_1m"] = _load()

        statuses = Statuses()
        with _client_cpu(cpu, "idle"):
            res["idle"] = closed_loop(
                url,
                order_sender(traders, args.seed, "i", statuses),
                connections=1,
                warmup_s=min(args.warmup, 1.0),
                seconds=min(args.seconds, IDLE_SECONDS),
            )
            res["idle"]["statuses"] = statuses.as_dict()

        statuses = Statuses()
        rate = max(1.0, LOAD_FRACTION * res["single"]["per_s"])
        with _client_cpu(cpu, "latency"):
            res["latency"] = open_loop(
                url,
                order_sender(traders, args.seed, "l", statuses),
                connections=args.connections,
                rate=rate,
                warmup_s=min(args.warmup, 2.0),
                seconds=args.seconds,
            )
            res["latency"]["statuses"] = statuses.as_dict()
            res["latency"]["load_average_1m"] = _load()

        # The ceiling before the paths judged against it: every phase leaves orders resting,
        # and a deeper book costs more per command, so measured last it would be lower.
        statuses = Statuses()
        with _client_cpu(cpu, "ceiling"):
            res["ceiling"] = closed_loop(
                url,
                commands_sender(cluster.admin_credentials(), traders, args.seed, "c", statuses),
                connections=args.batch_connections,
                **phase,
            )
            res["ceiling"]["statuses"] = statuses.as_dict()
            res["ceiling"]["load_average_1m"] = _load()

        # The batch paths keep as many orders in flight as the ceiling did (see 3 and 5).
        in_flight = args.batch_connections * CEILING_PER_REQUEST
        statuses = Statuses()
        with _client_cpu(cpu, "batch"):
            res["batch"] = closed_loop(
                url,
                batch_sender(traders, args.seed, "b", statuses),
                connections=-(-in_flight // BATCH_SIZE),
                **phase,
            )
            res["batch"]["statuses"] = statuses.as_dict()
            res["batch"]["load_average_1m"] = _load()

        with _client_cpu(cpu, "ws"):
            res["ws"] = ws_phase(
                url,
                traders,
                seed=args.seed,
                connections=args.ws_connections,
                window=args.ws_window,
                **phase,
            )
            res["ws"]["load_average_1m"] = _load()

        with _client_cpu(cpu, "ws_batch"):
            res["ws_batch"] = ws_phase(
                url,
                traders,
                seed=args.seed,
                connections=-(-in_flight // (WS_BATCH_WINDOW * BATCH_SIZE)),
                window=WS_BATCH_WINDOW,
                per_message=BATCH_SIZE,
                **phase,
            )
            res["ws_batch"]["load_average_1m"] = _load()

        statuses_end = cluster.wait_converged(60)
        res["state_hashes_equal"] = len({s["state_hash"] for s in statuses_end.values()}) == 1
        res["cmd_index_end"] = next(iter(statuses_end.values()))["cmd_index"]
        res["engines"] = sorted({s.get("engine", "?") for s in statuses_end.values()})
        after = cluster.status(leader) or {}
        res["leader"] = leader
        res["term_after"] = max(
            (st["term"] for st in cluster.statuses().values() if st), default=None
        )
        res["leader_kept"] = (
            after.get("role") == "leader" and after.get("term") == res["term_before"]
        )
    for key, value in cpu.items():
        res[key].update(value)
    res["load_average_1m_after"] = _load()

    single, trivial = res["single"]["per_s"], res["trivial"]["per_s"]
    res["ratio_trivial"] = single / trivial if trivial else float("nan")
    echo = res["trivial_post"]["per_s"]
    res["ratio_trivial_post"] = echo / trivial if trivial else float("nan")
    res["ratio_echo"] = single / echo if echo else float("nan")
    ceiling = res["ceiling"]["per_s"]

    def share(value: float, of: float) -> float:
        return value / of if of else float("nan")

    res["ratio_ws_single"] = share(res["ws"]["per_s"], single)
    res["share_batch_ceiling"] = share(res["batch"]["per_s"], ceiling)
    res["share_ws_batch_ceiling"] = share(res["ws_batch"]["per_s"], ceiling)
    res["p99_over_idle_p50"] = share(res["latency"]["p99_ms"], res["idle"]["p50_ms"])
    res["targets"] = {
        "single_vs_trivial": res["ratio_trivial"] >= REST_RATIO_TARGET,
        "p99_at_half_vs_idle": res["p99_over_idle_p50"] <= P99_OVER_IDLE_TARGET,
        "batch_vs_ceiling": res["share_batch_ceiling"] >= CEILING_SHARE_TARGET,
        "ws_vs_single": res["ratio_ws_single"] >= WS_RATIO_TARGET,
        "ws_batch_vs_ceiling": res["share_ws_batch_ceiling"] >= CEILING_SHARE_TARGET,
    }
    res["pass"] = all(res["targets"].values()) and res["state_hashes_equal"]
    return res


# ---------------------------------------------------------------- report


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _conn_line(r: dict) -> str:
    return (
        f"client CPU {r['client_cpu_share']:.0%} of a core; connections opened {r['connections_opened']}, closed by the server "
        f"(Connection: close) {r['closed_by_server']}, dropped before a response "
        f"{r['lost_before_response']}; statuses {r['statuses']}"
    )


def print_report(res: dict) -> None:
    t, s, lat, b, w = res["trivial"], res["single"], res["latency"], res["batch"], res["ws"]
    tg = res["targets"]
    print(
        f"API benchmark: 3 node processes + the baseline app + this client on {res['cpus']} "
        f"CPUs; 1-minute load average {res['load_average_1m_before']:.2f} before the run, "
        f"{res['load_average_1m_after']:.2f} after (other work on the machine competes)"
    )
    print(
        f"Cluster: journal + fsync, node batching; per-key rate limit raised to "
        f"{res['rate_limit_per_s']:,.0f}/s (burst the same; default 200/s, burst 400) so the "
        f"limiter runs but never refuses; state machine {'/'.join(res['engines'])}; requests "
        f"to the leader {res['leader']} (term {res['term_before']} -> {res['term_after']}; "
        f"{'kept' if res['leader_kept'] else 'LOST'} its leadership through the run)"
    )
    print()
    print(
        f"1. single-order REST, {s['connections']} keep-alive connections, one request in "
        f"flight each, {s['seconds']:.0f} s measured:"
    )
    print(
        f"   baseline GET /ping (Quart-trio, one route)  {t['per_s']:>9,.0f} req/s  "
        f"p50 {t['p50_ms']:.1f} ms, p99 {t['p99_ms']:.1f} ms  (load {t['load_average_1m']:.2f})"
    )
    print(f"     {_conn_line(t)}")
    print(
        f"   POST /v1/orders (signed, committed)         {s['per_s']:>9,.0f} orders/s  "
        f"p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms  (load {s['load_average_1m']:.2f})"
    )
    print(f"     {_conn_line(s)}; unknown outcome {s['unknown_outcome']}")
    tp = res["trivial_post"]
    print(
        f"   for reading: the baseline app's POST /echo (an order-shaped JSON body in, 201 and "
        f"JSON out, no work) {tp['per_s']:,.0f} req/s = {res['ratio_trivial_post']:.0%} of "
        f"GET /ping; ours = {res['ratio_echo']:.0%} of it"
    )
    print(
        f"   ours / baseline = {res['ratio_trivial']:.1%}  (target >= "
        f"{REST_RATIO_TARGET:.0%})  {_verdict(tg['single_vs_trivial'])}"
    )
    print()
    idle = res["idle"]
    print(
        f"2. idle: one connection, one order at a time, {idle['seconds']:.0f} s: "
        f"{idle['per_s']:,.0f} orders/s, p50 {idle['p50_ms']:.2f} ms, p99 "
        f"{idle['p99_ms']:.2f} ms"
    )
    print(
        f"   latency at {LOAD_FRACTION:.0%} of the peak of 1: open loop at "
        f"{lat['rate_target']:,.0f} req/s over {lat['connections']} connections, "
        f"{lat['seconds']:.0f} s, latency from each request's scheduled time:"
    )
    print(
        f"   achieved {lat['per_s']:,.0f} orders/s; p50 {lat['p50_ms']:.1f} ms, p99 "
        f"{lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms; requests sent over 1 ms "
        f"after their time (no connection free) {lat['started_late_over_1ms']:,}"
    )
    print(f"     {_conn_line(lat)}")
    print(
        f"   p99 at {LOAD_FRACTION:.0%} / idle p50 = {res['p99_over_idle_p50']:.2f}x  (target <= "
        f"{P99_OVER_IDLE_TARGET:.0f}x)  {_verdict(tg['p99_at_half_vs_idle'])}"
    )
    print()
    print(
        f"3. batch REST, {b['connections']} connections x {BATCH_SIZE} orders per "
        f"POST /v1/orders/batch ({b['connections'] * BATCH_SIZE:,} orders in flight, as the "
        f"ceiling), {b['seconds']:.0f} s:"
    )
    print(
        f"   {b['per_s']:,.0f} orders/s ({b['acknowledged']:,} answered 201 in "
        f"{b['requests']:,} requests); request p50 {b['p50_ms']:.0f} ms, p99 "
        f"{b['p99_ms']:.0f} ms  (load {b['load_average_1m']:.2f})"
    )
    print(f"     {_conn_line(b)}")
    print(
        f"   = {res['share_batch_ceiling']:.0%} of the commit ceiling (6)  (target >= "
        f"{CEILING_SHARE_TARGET:.0%})  {_verdict(tg['batch_vs_ceiling'])}"
    )
    print()
    print(
        f"4. WebSocket order entry, {w['connections']} authenticated sockets x "
        f"{w['window']} requests in flight, {w['seconds']:.0f} s:"
    )
    print(
        f"   {w['per_s']:,.0f} orders/s ({w['acknowledged']:,} responses 201); response "
        f"p50 {w['p50_ms']:.0f} ms, p99 {w['p99_ms']:.0f} ms  (load "
        f"{w['load_average_1m']:.2f}); client CPU {w['client_cpu_share']:.0%} of a core; "
        f"statuses {w['statuses']}"
    )
    print(
        f"   / single-order REST (1) = {res['ratio_ws_single']:.2f}x  (target >= "
        f"{WS_RATIO_TARGET:.0f}x)  {_verdict(tg['ws_vs_single'])}"
    )
    wb = res["ws_batch"]
    print()
    print(
        f"5. WebSocket batch order entry (the high-rate client's path), "
        f"{wb['connections']} sockets x {wb['window']} place_batch messages of "
        f"{wb['per_message']} orders in flight "
        f"({wb['connections'] * wb['window'] * wb['per_message']:,} orders, as the ceiling), "
        f"{wb['seconds']:.0f} s:"
    )
    print(
        f"   {wb['per_s']:,.0f} orders/s ({wb['acknowledged']:,} orders answered 201); "
        f"message p50 {wb['p50_ms']:.0f} ms, p99 {wb['p99_ms']:.0f} ms  (load "
        f"{wb['load_average_1m']:.2f}); statuses {wb['statuses']}"
    )
    print(
        f"   = {res['share_ws_batch_ceiling']:.0%} of the commit ceiling (6)  (target >= "
        f"{CEILING_SHARE_TARGET:.0%})  {_verdict(tg['ws_batch_vs_ceiling'])}"
    )
    c = res["ceiling"]
    print()
    print(
        f"6. the cluster's commit ceiling (3 and 5 are judged against it): {c['connections']} admin "
        f"connections x {CEILING_PER_REQUEST} place commands per POST /v1/admin/commands "
        f"({c['connections'] * CEILING_PER_REQUEST:,} orders in flight), "
        f"{c['seconds']:.0f} s:"
    )
    print(
        f"   {c['per_s']:,.0f} orders/s committed; request p50 {c['p50_ms']:.0f} ms, p99 "
        f"{c['p99_ms']:.0f} ms  (load {c['load_average_1m']:.2f}); client CPU "
        f"{c['client_cpu_share']:.0%} of a core; statuses {c['statuses']}"
    )
    errors = [e for r in (t, tp, s, idle, lat, b, w, wb, c) for e in r["errors"]]
    if errors:
        print(f"\nclient errors: {errors}")
    print(
        f"\nstate hashes equal on every node after the run: "
        f"{_verdict(res['state_hashes_equal'])} (cmd_index {res['cmd_index_end']:,})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per phase")
    ap.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per phase")
    ap.add_argument(
        "--connections", type=int, default=32, help="single-order REST and baseline connections"
    )
    ap.add_argument("--batch-connections", type=int, default=4)
    ap.add_argument("--ws-connections", type=int, default=4)
    ap.add_argument("--ws-window", type=int, default=256, help="requests in flight per socket")
    ap.add_argument("--accounts", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (node logs)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when a target is missed (default: 0 once the run completed, "
        "so `make bench` runs every benchmark)",
    )
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="qb-bench-api-"))
    try:
        res = run(root, args)
    finally:
        if args.keep:
            print(f"(kept {root})", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(res, sort_keys=True, default=str))
    else:
        print_report(res)
    return 1 if args.strict and not res["pass"] else 0


if __name__ == "__main__":
    sys.exit(main())
