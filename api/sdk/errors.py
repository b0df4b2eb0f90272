"""How an SDK call can fail: definitely (nothing applied) or with an unknown outcome.

STYLE.md 9 and docs/reference/sdk.md ("Outcomes"): `ApiError` and `ClusterUnavailable` are
definite, `OutcomeUnknown` is not. The same three for `Client`, `AsyncClient`, `AdminClient`
and the subscriptions.
"""

from __future__ import annotations


class ClusterUnavailable(Exception):
    """Definite: no node answered as leader before the deadline; nothing was applied.

    (For `AdminClient.status`/`balances`, which ask one given node: that node did not answer.)
    """


class OutcomeUnknown(ClusterUnavailable):
    """Indefinite: an attempt may have been applied, and no retry settled it in time.

    Resend the same request (same `client_order_id`, same `ref`) later to settle it, or look
    it up (`order_by_client_id`, the balances).
    """


class ApiError(Exception):
    """A definite error answer (a 4xx, or a node's final `503 not_configured`): the request
    was not applied.

    `after_retry` is true when an earlier attempt of the same call had an unknown outcome:
    then `unknown_order` (cancel), `no_change` (amend) and `no_open_orders` (cancel_all) mean
    that the first attempt most likely took effect (docs/reference/sdk.md).

    `seq` is the `rejected` event's seq when the exchange rejected the command in the log (it
    took a `cmd_index`, changing nothing else); None when it was refused before the log.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        order_id: int | None = None,
        *,
        after_retry: bool = False,
        seq: int | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.order_id = order_id
        self.after_retry = after_retry
        self.seq = seq
