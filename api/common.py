"""What every HTTP route shares: the error body, the leader redirect and signed-caller guards."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from quart import Response, request

from .auth import SIG_HEADER, TS_HEADER, AuthError, Credentials, UnknownKeyError, Verifier
from .jsoncodec import dumps, loads
from .port import NodePort
from .rate_limit import RateLimiter


def json_response(value: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(
        dumps(value), status=status, content_type="application/json", headers=headers or {}
    )


def error(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    return json_response({"error": {"code": code, "message": message}}, status, headers)


def rate_limited_body(retry_after_s: int) -> dict:
    """The 429 body (REST and WebSocket): this key's token bucket is empty, nothing applied."""
    return {
        "error": {
            "code": "rate_limited",
            "message": f"too many requests for this key; retry after {retry_after_s} s "
            "(nothing was applied)",
            "retry_after_s": retry_after_s,
        }
    }


def rate_limited(retry_after_s: int) -> Response:
    return json_response(rate_limited_body(retry_after_s), 429, {"Retry-After": str(retry_after_s)})


class Http:
    """Request helpers bound to one node and its key verifier."""

    def __init__(
        self,
        node: NodePort,
        verifier: Verifier,
        limiter: RateLimiter | None = None,
        limited: Any = None,
    ) -> None:
        self.node = node
        self.verifier = verifier
        self.limiter = limiter
        self.limited = limited  # a prometheus Counter labelled by role, if any

    def not_leader(self) -> Response:
        """307 to the leader's same path (header X-Leader), or 503 + Retry-After without one."""
        url = self.node.leader_url()
        if url is None:
            return error(503, "no_leader", "no leader elected yet; retry", {"Retry-After": "1"})
        location = url + request.full_path.rstrip("?")
        return error(
            307, "not_leader", "writes go to the leader", {"Location": location, "X-Leader": url}
        )

    async def caller(self, role: str) -> Credentials | Response:
        """The signed caller holding a `role` key, or the 401/403/429 (or redirect) to answer.

        A key the node does not know yet may have been created a moment ago and not be
        applied here: a follower sends such a request to the leader, which knows every key
        it acknowledged, instead of refusing it.
        """
        body = await request.get_data()
        path = request.full_path.rstrip("?")
        # A replay this node has not seen, nor applied yet (say, accepted by the previous
        # leader a moment ago), passes here: the state machine refuses it when it applies it
        # (its replicated replay window), and the submit answers 401 replayed.
        try:
            creds = self.verifier.verify(request.headers, request.method, path, body)
        except UnknownKeyError as exc:
            if not self.node.is_leader():
                return self.not_leader()
            return error(401, exc.code, exc.message)
        except AuthError as exc:
            return error(401, exc.code, exc.message)
        if self.limiter is not None:
            retry_after_s = self.limiter.check(creds.key_id, creds.role)
            if retry_after_s is not None:
                if self.limited is not None:
                    self.limited.labels(creds.role).inc()
                return rate_limited(retry_after_s)
        if creds.role != role or (role == "trader" and not creds.account):
            return error(403, "forbidden", f"this route needs a {role} key")
        return creds

    @staticmethod
    def signed_request() -> tuple[str, int]:
        """(signature, ts_ms) of the current request, which `caller` verified: the submit
        carries it, and raises AuthError ("replayed"/"expired", a 401) if the cluster's
        replay window refuses it."""
        return request.headers[SIG_HEADER], int(request.headers[TS_HEADER])

    def authed(self, role: str = "trader", leader: bool = False):
        """Route decorator: the handler gets the caller's Credentials first. `leader=True`:
        a follower answers with the redirect before reading anything else."""

        def wrap(handler: Callable[..., Awaitable[Any]]):
            async def inner(*args: Any, **kwargs: Any) -> Any:
                creds = await self.caller(role)
                if isinstance(creds, Response):
                    return creds
                if leader and not self.node.is_leader():
                    return self.not_leader()
                return await handler(creds, *args, **kwargs)

            inner.__name__ = handler.__name__
            inner.__doc__ = handler.__doc__
            return inner

        return wrap

    async def json_object(self, reserved: tuple[str, ...] = ()) -> dict | Response:
        """The body as a JSON object ({} when empty), or the 400 to answer."""
        raw = await request.get_data()
        try:
            payload = loads(raw) if raw else {}
        except ValueError:
            return error(400, "malformed_json", "body is not valid JSON")
        if not isinstance(payload, dict):
            return error(400, "bad_request", "body must be a JSON object")
        for field in reserved:
            if field in payload:
                return error(400, "field_not_allowed", f"field {field!r} is set by the server")
        return payload
