"""Error types of the state machine.

Bad commands never raise: they become `rejected` events (see `validation.py`). These
exceptions are for the two other failure kinds, kept apart on purpose: a snapshot that is
not ours or is damaged (`SnapshotError`), and a broken internal invariant (`InvariantError`),
which means a bug and must stop the replica rather than let it diverge.
"""


class SnapshotError(ValueError):
    """A snapshot blob is truncated, corrupted, of an unknown version, or not ours."""


class InvariantError(AssertionError):
    """An internal invariant of the exchange does not hold; the message names the rule."""


class Rejection(Exception):
    """Raised inside command handlers to abandon a command before it changed anything.

    Internal to the package: `Exchange.apply` turns it into a `rejected` event.
    """

    __slots__ = ("message", "order_id", "reason")

    def __init__(self, reason: str, message: str, order_id: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message = message
        self.order_id = order_id
