"""A real chain for the chain watcher's tests: one anvil node per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from indexer.chain.anvil import Anvil, AnvilUnavailable


@pytest.fixture(scope="module")
def anvil() -> Iterator[Anvil]:
    try:
        node = Anvil()
    except AnvilUnavailable as exc:
        pytest.fail(str(exc))  # make test installs it: missing is a failure, not a skip
    with node:
        yield node


@pytest.fixture
def chain(anvil: Anvil) -> Iterator[Anvil]:
    """Each test on the chain as the module found it (evm_revert after it)."""
    snapshot = anvil.snapshot()
    yield anvil
    anvil.revert(snapshot)
