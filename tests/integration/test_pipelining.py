"""HTTP/1.1 pipelining against a node (docs/adr/0004-hypercorn-pipelining.md).

A raw client writes many requests in one go, before reading any response. Hypercorn's h11
protocol pauses parsing while a response is pending, so the node answers them one at a time,
in order: every response arrives whole, and nothing is lost or interleaved.
"""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

from api.auth import KEY_HEADER, SIG_HEADER, TS_HEADER, sign

from .conftest import admin

MARKET = {
    "op": "create_market",
    "market": "PIPE-USD",
    "base": "PIPE",
    "quote": "USD",
    "lot_size": 1,
    "tick_size": 1,
    "maker_fee_bps": 0,
    "taker_fee_bps": 0,
}


def _order_request(creds, host: str, coid: str, price: int) -> bytes:
    body = json.dumps(
        {
            "market": "PIPE-USD",
            "side": "buy",
            "type": "limit",
            "price": price,
            "qty": 1,
            "client_order_id": coid,
        }
    ).encode()
    ts = time.time_ns() // 1_000_000
    head = (
        f"POST /v1/orders HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{KEY_HEADER}: {creds.key_id}\r\n"
        f"{TS_HEADER}: {ts}\r\n{SIG_HEADER}: {sign(creds.secret, ts, 'POST', '/v1/orders', body)}"
        "\r\n\r\n"
    )
    return head.encode() + body


def _read_responses(sock: socket.socket, n: int) -> list[tuple[int, dict]]:
    """n whole responses (Content-Length framed), or fewer if the node closed the socket."""
    buf = b""
    out: list[tuple[int, dict]] = []
    while len(out) < n:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            lines = buf[:end].split(b"\r\n")
            length = next(
                int(v)
                for k, _, v in (ln.partition(b":") for ln in lines[1:])
                if k.strip().lower() == b"content-length"
            )
            if len(buf) >= end + 4 + length:
                body = buf[end + 4 : end + 4 + length]
                out.append((int(lines[0].split()[1]), json.loads(body)))
                buf = buf[end + 4 + length :]
                continue
        data = sock.recv(65536)
        if not data:
            break
        buf += data
    assert buf == b"", "bytes after the last whole response"
    return out


def test_pipelined_requests_get_every_response_whole_and_in_order(make_cluster) -> None:
    cluster = make_cluster(3)
    leader = cluster.wait_for_leader()
    url = cluster.nodes[leader].config.api_url
    with admin(cluster) as client:
        client.submit(
            [
                MARKET,
                {
                    "op": "deposit",
                    "account": "pipe",
                    "asset": "USD",
                    "amount": 10**12,
                    "ref": "pipe",
                },
            ]
        )
        creds = client.create_key("pipe")
    parts = urlsplit(url)
    host = f"{parts.hostname}:{parts.port}"
    # Orders and health checks alternate, so a response out of order or cut short shows.
    requests, expected = [], []
    for i in range(60):
        if i % 3 == 2:
            requests.append(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            expected.append(("health", None))
        else:
            requests.append(_order_request(creds, host, f"pipe-{i}", 900 + i))
            expected.append(("order", f"pipe-{i}"))
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(b"".join(requests))  # all of them before reading anything
        responses = _read_responses(sock, len(requests))
    assert len(responses) == len(requests)
    for (kind, coid), (status, body) in zip(expected, responses, strict=True):
        if kind == "health":
            assert (status, body["ok"]) == (200, True)
        else:
            assert status == 201, body
            assert body["client_order_id"] == coid and body["status"] == "resting"
    # Each pipelined order was applied exactly once.
    with admin(cluster) as client:
        rows = client.balances(url, "pipe")["balances"]
    reserved = sum(r["reserved"] for r in rows if r["asset"] == "USD")
    assert reserved == sum(900 + i for i in range(60) if i % 3 != 2)
