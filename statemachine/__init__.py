"""The pure, deterministic exchange every replica runs. Imports nothing of ours."""

from .errors import InvariantError, SnapshotError
from .exchange import Exchange

__all__ = ["Exchange", "InvariantError", "SnapshotError"]
