"""The node's HTTP API (Quart-trio on Hypercorn).

Health, status and the signed admin routes live here; the trading API is `api/trading.py`.
"""

from __future__ import annotations

import time

from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from statemachine.validation import safe_account

from . import openapi, trading, ws
from .auth import AuthError, Credentials, Verifier, new_key_id
from .common import Http, error, json_response
from .metrics import CONTENT_TYPE, Metrics
from .port import (
    MembershipBusyError,
    NodePort,
    NotLeaderError,
    OutcomeUnknownError,
    OverloadedError,
    UnencodableError,
)
from .rate_limit import RateLimiter

MAX_BODY_BYTES = 1 << 20
MAX_COMMANDS = 1000
READY_MAX_LAG_ENTRIES = 100


def readiness(health: dict, max_lag_entries: int = READY_MAX_LAG_ENTRIES) -> str | None:
    """Why this node cannot serve (None: it can). The rule of `GET /readyz`:
    a leader is known (this node, or another to which this node's link is up), and the node
    has applied the Raft log up to what it knows is committed, give or take
    `max_lag_entries` entries."""
    if health["leader"] is None:
        return f"no leader known (role {health['role']}, term {health['term']})"
    if not health["leader_connected"]:
        return f"no link to the leader {health['leader']} (term {health['term']})"
    lag = health["commit_index"] - health["applied_index"]
    if lag > max_lag_entries:
        return (
            f"applied index {health['applied_index']} is {lag} entries behind commit "
            f"index {health['commit_index']} (at most {max_lag_entries})"
        )
    return None


def create_app(
    node: NodePort,
    verifier: Verifier,
    *,
    limiter: RateLimiter | None = None,
    ready_max_lag_entries: int = READY_MAX_LAG_ENTRIES,
) -> QuartTrio:
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]  # events keep their field order
    metrics = Metrics(node)
    limiter = RateLimiter() if limiter is None else limiter

    @app.before_request
    async def start_clock() -> None:
        g.qb_started = time.perf_counter()

    @app.after_request
    async def count_request(response: Response) -> Response:
        started = getattr(g, "qb_started", None)
        if started is not None:
            # The route template, never the raw path: the label set stays bounded.
            route = request.url_rule.rule if request.url_rule is not None else "unmatched"
            metrics.observe_request(
                route, request.method, response.status_code, time.perf_counter() - started
            )
        return response

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        return error(exc.code or 400, code, exc.description or exc.name or "error")

    @app.errorhandler(UnencodableError)
    async def unencodable(exc: UnencodableError) -> Response:
        return error(400, "wrong_type", f"{exc}; integers must fit in 64 bits")

    @app.errorhandler(OverloadedError)
    async def overloaded(exc: OverloadedError) -> Response:
        return error(503, "overloaded", f"{exc}; nothing was applied, retry", {"Retry-After": "1"})

    http = Http(node, verifier, limiter, metrics.rate_limited)
    not_leader_response = http.not_leader
    json_body = http.json_object

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True, "node_id": node.node_id}

    @app.get("/readyz")
    async def readyz() -> Response | dict:
        health = node.health()
        reason = readiness(health, ready_max_lag_entries)
        if reason is not None:
            return error(503, "not_ready", reason, {"Retry-After": "1"})
        return {
            "ready": True,
            "node_id": node.node_id,
            "role": health["role"],
            "leader": health["leader"],
            "lag_entries": health["commit_index"] - health["applied_index"],
        }

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), status=200, content_type=CONTENT_TYPE)

    @app.get("/v1/cluster/status")
    async def cluster_status() -> dict:
        return await node.status()

    @app.get(openapi.PATH)
    async def openapi_document() -> dict:
        return openapi.document()

    @app.post("/v1/admin/commands")
    @http.authed("admin", leader=True)
    async def admin_commands(_: Credentials) -> Response | dict:
        payload = await json_body()
        if isinstance(payload, Response):
            return payload
        commands = payload.get("commands")
        if not isinstance(commands, list) or not commands:
            return error(400, "bad_request", 'body must be {"commands": [command, ...]}')
        if len(commands) > MAX_COMMANDS:
            return error(413, "too_many_commands", f"at most {MAX_COMMANDS} commands per request")
        started = time.perf_counter()
        try:
            # One slot for the whole request: committed together, no task per command.
            results = [
                {"events": events}
                for events in await node.submit_many(commands, http.signed_request())
            ]
        except NotLeaderError as exc:
            results = [
                {"error": {"code": "not_leader", "message": str(exc), "leader_url": exc.leader_url}}
            ] * len(commands)
        except OutcomeUnknownError as exc:
            results = [{"error": {"code": "outcome_unknown", "message": str(exc)}}] * len(commands)
        except AuthError as exc:  # the cluster's replay window refused it: nothing applied
            return error(401, exc.code, exc.message)
        return json_response(
            {"results": results, "elapsed_ms": round((time.perf_counter() - started) * 1000, 3)}
        )

    @app.get("/v1/admin/balances")
    @http.authed("admin")
    async def admin_balances(_: Credentials) -> Response | dict:
        """This node's applied balances (a stale read; see the API issue for linearizable reads)."""
        account = request.args.get("account")
        rows = node.read(lambda ex: ex.balances(account))
        return {
            "node_id": node.node_id,
            "cmd_index": node.read(lambda ex: ex.cmd_index),
            "balances": [
                {"account": acct, "asset": asset, "available": a, "reserved": r}
                for (acct, asset), (a, r) in rows.items()
            ],
        }

    @app.post("/v1/admin/members")
    @http.authed("admin", leader=True)
    async def admin_members(_: Credentials) -> Response | dict:
        """Add or remove one member: {"action": "add"|"remove", "id", "raft_addr", "api_url"}."""
        payload = await json_body()
        if isinstance(payload, Response):
            return payload
        action = payload.get("action")
        fields = [payload.get(k) for k in ("id", "raft_addr", "api_url")]
        if action not in ("add", "remove") or not all(isinstance(f, str) and f for f in fields):
            return error(
                400,
                "bad_request",
                'body must be {"action": "add"|"remove", "id", "raft_addr", "api_url"}',
            )
        try:
            done = await node.change_membership(action, *fields)
        except MembershipBusyError as exc:
            return error(
                409,
                "membership_change_in_progress",
                f"{exc}; one membership change at a time: retry once it commits",
                {"Retry-After": "1"},
            )
        except NotLeaderError as exc:
            return error(409, "membership_change_failed", str(exc))
        except OutcomeUnknownError as exc:
            return error(503, "outcome_unknown", str(exc), {"Retry-After": "1"})
        return {"change": done, **await node.status()}

    @app.post("/v1/admin/transfer-leader")
    @http.authed("admin", leader=True)
    async def admin_transfer_leader(_: Credentials) -> Response | dict:
        """Hand leadership over: {"to": node_id} or {} for the most caught-up peer."""
        payload = await json_body()
        if isinstance(payload, Response):
            return payload
        target = payload.get("to")
        if target is not None and not isinstance(target, str):
            return error(400, "bad_request", '"to" must be a node id')
        try:
            await node.transfer_leadership(target)
        except NotLeaderError as exc:
            return error(409, "transfer_failed", str(exc))
        except OutcomeUnknownError as exc:
            return error(503, "outcome_unknown", str(exc), {"Retry-After": "1"})
        return {"requested": True, "to": target}

    @app.post("/v1/admin/keys")
    @http.authed("admin", leader=True)
    async def admin_create_key(_: Credentials) -> Response | dict:
        """Create an API key: {"account": A, "role": "trader"} -> {key_id, secret, ...}.

        The secret is shown once, here; the cluster stores only (key id, account, role).
        """
        payload = await json_body()
        if isinstance(payload, Response):
            return payload
        account = payload.get("account")
        role = payload.get("role", "trader")
        if not isinstance(account, str) or not account or role not in ("trader", "admin"):
            return error(
                400, "bad_request", 'body must be {"account": A, "role": "trader"|"admin"}'
            )
        if safe_account({"account": account}) is None:
            # A key for an account no command could name would only ever be refused.
            return error(
                400,
                "bad_account",
                "account ids are 1-64 characters of letters, "
                "digits and . : - _ (not starting with _)",
            )
        key_id = new_key_id(role)
        try:
            secret = await node.create_key(key_id, account, role, http.signed_request())
        except AuthError as exc:  # replayed: the replicated replay window holds it
            return error(401, exc.code, exc.message)
        except NotLeaderError:
            return not_leader_response()
        except OutcomeUnknownError as exc:
            return error(503, "outcome_unknown", str(exc), {"Retry-After": "1"})
        return {"key_id": key_id, "secret": secret, "account": account, "role": role}

    trading.register(app, node, http)
    ws.register(app, node, verifier, limiter=limiter)

    @app.post("/v1/admin/barrier")
    @http.authed("admin", leader=True)
    async def admin_barrier(_: Credentials) -> Response | dict:
        try:
            await node.read_barrier()
        except NotLeaderError:
            return not_leader_response()
        except OutcomeUnknownError as exc:
            return error(503, "outcome_unknown", str(exc), {"Retry-After": "1"})
        return await node.status()

    return app
