"""The single-order write routes on ASGI directly, in front of the Quart app.

`POST /v1/orders`, `/v1/orders/cancel`, `/v1/orders/amend` and `/v1/orders/cancel-all` are
what a trading client calls once per order. Through Quart each request costs a nursery and
two tasks (quart-trio relays the body from one to the other), the request and response
objects, the context and the hooks: more CPU than the order's own work on the leader, whose
one thread serves every request (docs/adr/0012-cost-per-order.md). Here the same steps run
on the server's ASGI messages: signature, rate limit and role (`Http.check_caller`), the
body (`bodies.command_fields`), the precheck and the submit (`trading.write_reply`): the same
functions as the Quart routes, so the same answers, and the same request metric.

What this path leaves to the Quart routes of trading.py, which stay registered: a request
with a query string, or whose `Content-Length` is over the app's limit (Quart answers 413).
A body without one (chunked) that grows past the limit gets the same 413 here, and a body
that takes longer than the app's `BODY_TIMEOUT` the same 408. Other methods and paths never
come here.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio
from werkzeug.exceptions import InternalServerError, RequestEntityTooLarge, RequestTimeout

from . import bodies
from .auth import Credentials
from .bodies import BodyError
from .common import Http, Reply, error_reply, http_exception_reply, signed_by
from .port import NodePort
from .sdk.codec import dumps
from .trading import SINGLE_WRITES, write_reply

log = logging.getLogger(__name__)

_JSON = (b"content-type", b"application/json")


class Headers:
    """A request's headers by case-insensitive name (the first of repeated ones, as
    werkzeug's `Headers.get`), for `Verifier.verify`."""

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._by_name: dict[str, str] = {}
        for name, value in raw:
            self._by_name.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))

    def get(self, name: str) -> str | None:
        return self._by_name.get(name.lower())


def content_length(raw: list[tuple[bytes, bytes]]) -> int | None:
    lengths = [value for name, value in raw if name.lower() == b"content-length"]
    if len(lengths) != 1 or not lengths[0].isdigit():
        return None
    return int(lengths[0])


def install(app: Any, node: NodePort, http: Http, observe: Any, max_body_bytes: int) -> None:
    """Put the routes in front of `app` (a Quart app: its `asgi_app` is the hook for ASGI
    middleware). `observe(route, method, status, seconds)`: the request metric."""
    quart_app = app.asgi_app
    body_timeout_s = app.config["BODY_TIMEOUT"]  # Quart's: a body slower than this gets a 408

    async def asgi_app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope["query_string"]:
            route = SINGLE_WRITES.get(scope["path"])
            if route is not None:
                length = content_length(scope["headers"])
                if length is None or length <= max_body_bytes:
                    await _serve(scope, receive, send, route)
                    return
        await quart_app(scope, receive, send)

    async def _serve(scope: dict, receive: Any, send: Any, route: tuple[str, int]) -> None:
        started = time.perf_counter()
        path = scope["path"]
        body: bytes | None = None
        with trio.move_on_after(body_timeout_s):
            body = await _read_body(receive, max_body_bytes)
            if body is None:
                return  # the client went away before sending it all
        try:
            if body is None:
                status, value, headers = http_exception_reply(RequestTimeout())
            elif len(body) > max_body_bytes:
                status, value, headers = http_exception_reply(RequestEntityTooLarge())
            else:
                status, value, headers = await _answer(scope["headers"], path, body, *route)
        except Exception:
            log.exception("Exception on request POST %s", path)
            status, value, headers = http_exception_reply(InternalServerError())
        observe(path, "POST", status, time.perf_counter() - started)
        payload = dumps(value)
        head = [_JSON, (b"content-length", str(len(payload)).encode())]
        head.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": payload})

    async def _answer(
        raw: list[tuple[bytes, bytes]], path: str, body: bytes, op: str, ok_status: int
    ) -> Reply:
        headers = Headers(raw)
        creds = http.check_caller(headers, "POST", path, body, "trader")
        if not isinstance(creds, Credentials):
            return creds
        try:
            fields = bodies.command_fields(body)
        except BodyError as exc:
            return error_reply(exc.status, exc.code, exc.message)
        command = {"op": op, **fields, "account": creds.account}
        return await write_reply(node, command, ok_status, signed_by(headers), path)

    app.asgi_app = asgi_app


async def _read_body(receive: Any, limit: int) -> bytes | None:
    """The request's body (the server enforces its Content-Length) or, past `limit` bytes,
    what was read by then; None on a disconnect."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > limit or not message.get("more_body", False):
            return b"".join(chunks)
