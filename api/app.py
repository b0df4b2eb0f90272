"""The node's HTTP API (Quart-trio on Hypercorn).

Health, status and the signed admin routes live here; the trading API is `api/trading.py`.
"""

from __future__ import annotations

import time

from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import bodies, fastpath, openapi, outcomes, trading, ws
from .auth import AuthError, Credentials, Verifier, new_key_id
from .bodies import (
    CommandsRequest,
    DepositAddressRequest,
    EmptyRequest,
    KeyRequest,
    MembersRequest,
    TransferRequest,
)
from .common import (
    Http,
    answer_response,
    error,
    http_exception_reply,
    json_response,
    reply_response,
)
from .metrics import CONTENT_TYPE, Metrics
from .port import NodeError, NodePort
from .rate_limit import RateLimiter

MAX_BODY_BYTES = 1 << 20
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
    ws_settings: ws.Settings | None = None,
) -> QuartTrio:
    """The node's app. `ws_settings`: the WebSocket's ([ws] of the node's config; None:
    its defaults with the QB_WS_* environment overrides)."""
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
        return reply_response(http_exception_reply(exc))

    # One mapping from what the node answers to HTTP, for every route (api/outcomes.py): the
    # routes raise, these answer.
    @app.errorhandler(NodeError)
    async def node_error(exc: NodeError) -> Response:
        return answer_response(outcomes.answer(exc, node.leader_url()))

    @app.errorhandler(AuthError)
    async def refused(exc: AuthError) -> Response:  # the cluster's replay window refused it
        return answer_response(outcomes.answer(exc))

    @app.errorhandler(bodies.BodyError)
    async def bad_body(exc: bodies.BodyError) -> Response:
        return error(exc.status, exc.code, exc.message)

    http = Http(node, verifier, limiter, metrics.rate_limited)

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
    @http.body(CommandsRequest)
    async def admin_commands(_: Credentials, body: CommandsRequest) -> Response:
        started = time.perf_counter()
        # One slot for the whole request: committed together (all or none), no task per
        # command; a failure is the whole request's (307 to the leader, 503, ...).
        applied = await node.submit_many(body.commands, http.signed_request())
        return json_response(
            {
                "results": [{"events": events} for events in applied],
                "elapsed_ms": round((time.perf_counter() - started) * 1000, 3),
            }
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

    @app.get("/v1/admin/snapshot")
    @http.authed("admin")
    async def admin_snapshot(_: Credentials) -> Response:
        """This node's state at its applied index, as bytes (a backup: ask a follower, whose
        apply it holds up while it is taken; the leader's never waits for it)."""
        taken = await node.snapshot()
        headers = {
            "X-QB-Node-Id": node.node_id,
            "X-QB-Cluster-Id": taken.get("cluster_id") or "",
            "X-QB-Role": str(taken["role"]),
            "X-QB-Applied-Index": str(taken["applied_index"]),
            "X-QB-Cmd-Index": str(taken["cmd_index"]),
            "X-QB-Seq": str(taken["seq"]),
            "X-QB-State-Hash": taken["state_hash"],
        }
        return Response(
            taken["blob"], status=200, content_type="application/octet-stream", headers=headers
        )

    @app.post("/v1/admin/members")
    @http.authed("admin", leader=True)
    @http.body(MembersRequest)
    async def admin_members(_: Credentials, body: MembersRequest) -> dict:
        """Add or remove one member: {"action": "add"|"remove", "id", "raft_addr", "api_url"}."""
        done = await node.change_membership(body.action, body.id, body.raft_addr, body.api_url)
        return {"change": done, **await node.status()}

    @app.post("/v1/admin/transfer-leader")
    @http.authed("admin", leader=True)
    @http.body(TransferRequest)
    async def admin_transfer_leader(_: Credentials, body: TransferRequest) -> dict:
        """Hand leadership over: {"to": node_id} or {} for the most caught-up peer."""
        await node.transfer_leadership(body.to)
        return {"requested": True, "to": body.to}

    @app.post("/v1/admin/keys")
    @http.authed("admin", leader=True)
    @http.body(KeyRequest)
    async def admin_create_key(_: Credentials, body: KeyRequest) -> dict:
        """Create an API key: {"account": A, "role": "trader"} -> {key_id, secret, ...}.

        The secret is shown once, here; the cluster stores only (key id, account, role).
        """
        key_id = new_key_id(body.role)
        secret = await node.create_key(key_id, body.account, body.role, http.signed_request())
        return {"key_id": key_id, "secret": secret, "account": body.account, "role": body.role}

    @app.post("/v1/admin/deposit-addresses")
    @http.authed("admin", leader=True)
    @http.body(DepositAddressRequest)
    async def admin_assign_deposit_address(_: Credentials, body: DepositAddressRequest) -> dict:
        """Assign an EVM chain's deposit address to an account (replicated): {"change":
        "assigned" | "unchanged", ...}; 409 address_taken if another account has it."""
        change = await node.assign_deposit_address(
            body.chain_id, body.address, body.account, http.signed_request()
        )
        return {"change": change, "chain_id": body.chain_id, "address": body.address.lower(),
                "account": body.account}  # fmt: skip

    @app.get("/v1/admin/deposit-addresses")
    @http.authed("admin")
    async def admin_deposit_addresses(_: Credentials) -> Response | dict:
        """This node's applied deposit addresses (a stale read), `?chain_id=` to filter."""
        text = request.args.get("chain_id")
        if text is not None and not (text.isascii() and text.isdigit() and len(text) <= 16):
            return error(400, "bad_chain_id", "chain_id must be a positive integer")
        rows = node.deposit_addresses(int(text) if text is not None else None)
        return {
            "node_id": node.node_id,
            "addresses": [{"chain_id": c, "address": a, "account": acc} for c, a, acc in rows],
        }

    trading.register(app, node, http)
    ws.register(app, node, verifier, settings=ws_settings, limiter=limiter)
    # The single-order write routes again, on ASGI in front of the Quart app (api/fastpath.py):
    # the same answers, without Quart's per-request machinery.
    fastpath.install(app, node, http, metrics.observe_request, MAX_BODY_BYTES)

    @app.post("/v1/admin/barrier")
    @http.authed("admin", leader=True)
    @http.body(EmptyRequest)
    async def admin_barrier(_: Credentials, _body: EmptyRequest) -> dict:
        await node.read_barrier()
        return await node.status()

    return app
