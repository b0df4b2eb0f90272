"""What every HTTP route shares: the error body, the leader redirect and signed-caller guards."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from quart import Response, request
from werkzeug.exceptions import HTTPException

from . import bodies, outcomes
from .auth import SIG_HEADER, TS_HEADER, AuthError, Credentials, UnknownKeyError, Verifier
from .port import NodePort
from .rate_limit import RateLimiter
from .sdk.codec import dumps

# An answer before it is HTTP: (status, JSON value, extra headers). The Quart routes turn it
# into a Response (`reply_response`), the ASGI order routes (api/fastpath.py) write it
# themselves: one answer, two servers.
Reply = tuple[int, Any, dict[str, str]]


def json_response(value: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(
        dumps(value), status=status, content_type="application/json", headers=headers or {}
    )


def reply_response(reply: Reply) -> Response:
    status, value, headers = reply
    return json_response(value, status, headers)


def error_reply(status: int, code: str, message: str, headers: dict | None = None) -> Reply:
    return status, {"error": {"code": code, "message": message}}, headers or {}


def error(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    return reply_response(error_reply(status, code, message, headers))


def http_exception_reply(exc: HTTPException) -> Reply:
    """werkzeug's HTTP errors (404, 405, 408, 413, 500...) in the API's error body."""
    code = (exc.name or "error").lower().replace(" ", "_")
    return error_reply(exc.code or 400, code, exc.description or exc.name or "error")


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


def rate_limited_reply(retry_after_s: int) -> Reply:
    return 429, rate_limited_body(retry_after_s), {"Retry-After": str(retry_after_s)}


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
        return answer_response(outcomes.not_leader(self.node.leader_url()))

    async def caller(self, role: str) -> Credentials | Response:
        """The signed caller of the current request holding a `role` key, or the answer."""
        checked = self.check_caller(
            request.headers,
            request.method,
            full_path(),
            await request.get_data(),
            role,
        )
        return checked if isinstance(checked, Credentials) else reply_response(checked)

    def check_caller(
        self, headers: Any, method: str, path: str, body: bytes, role: str
    ) -> Credentials | Reply:
        """The signed caller holding a `role` key, or the 401/403/429 (or redirect) to answer.
        `headers`: a case-insensitive mapping; `path`: with the query, as signed.

        A key the node does not know yet may have been created a moment ago and not be
        applied here: a follower sends such a request to the leader, which knows every key
        it acknowledged, instead of refusing it.
        """
        # A replay this node has not seen, nor applied yet (say, accepted by the previous
        # leader a moment ago), passes here: the state machine refuses it when it applies it
        # (its replicated replay window), and the submit answers 401 replayed.
        try:
            creds = self.verifier.verify(headers, method, path, body)
        except UnknownKeyError as exc:
            if not self.node.is_leader():
                return answer_reply(outcomes.not_leader(self.node.leader_url()), path)
            return error_reply(401, exc.code, exc.message)
        except AuthError as exc:
            return error_reply(401, exc.code, exc.message)
        if self.limiter is not None:
            retry_after_s = self.limiter.check(creds.key_id, creds.role)
            if retry_after_s is not None:
                if self.limited is not None:
                    self.limited.labels(creds.role).inc()
                return rate_limited_reply(retry_after_s)
        if creds.role != role or (role == "trader" and not creds.account):
            return error_reply(403, "forbidden", f"this route needs a {role} key")
        return creds

    @staticmethod
    def signed_request() -> tuple[str, int]:
        """(signature, ts_ms) of the current request, which `caller` verified: the submit
        carries it, and raises AuthError ("replayed"/"expired", a 401) if the cluster's
        replay window refuses it."""
        return signed_by(request.headers)

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

    @staticmethod
    def body(kind: type[bodies.Body]):
        """Route decorator (under `authed`): the handler gets the body decoded into `kind`
        after the caller; a body that does not fit is answered 400/413 (BodyError)."""

        def wrap(handler: Callable[..., Awaitable[Any]]):
            async def inner(*args: Any, **kwargs: Any) -> Any:
                decoded = bodies.decode(await request.get_data(), kind)
                return await handler(*args, decoded, **kwargs)

            inner.__name__ = handler.__name__
            inner.__doc__ = handler.__doc__
            return inner

        return wrap

    @staticmethod
    async def command_fields(reserved: tuple[str, ...] = bodies.RESERVED_FIELDS) -> dict:
        """The fields of a state-machine command from the body (BodyError if it is not an
        object, or sets a field the node sets)."""
        return bodies.command_fields(await request.get_data(), reserved)


def signed_by(headers: Any) -> tuple[str, int]:
    """(signature, ts_ms) of a request whose signature `Http.check_caller` verified."""
    return headers.get(SIG_HEADER), int(headers.get(TS_HEADER))


def full_path() -> str:
    """The current request's path and query, as its signature covers it."""
    return request.full_path.rstrip("?")


def answer_reply(answer: outcomes.Answer, path: str) -> Reply:
    """The REST form of an outcome (api/outcomes.py): a 307 goes to the same `path` (with its
    query) on the leader."""
    headers = dict(answer.headers)
    if answer.status == 307 and answer.leader_url is not None:
        headers["Location"] = answer.leader_url + path
    return answer.status, answer.body(), headers


def answer_response(answer: outcomes.Answer) -> Response:
    return reply_response(answer_reply(answer, full_path()))
