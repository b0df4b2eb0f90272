"""The `final` checker: every acknowledged write in every node's final state, no log needed."""

from __future__ import annotations

from cluster.machine import ExchangeMachine
from jepsen.checkers import UNKNOWN, final
from statemachine import Exchange

from .test_checkers import minimal, trading_run


def state_of(commands: list[dict]) -> bytes:
    """A node snapshot (GET /v1/admin/snapshot's body) of the state after `commands`."""
    machine = ExchangeMachine()
    exchange = Exchange()
    for command in commands:
        exchange.apply(dict(command))
    machine.exchange = exchange
    return machine.snapshot()


def test_a_correct_run_is_valid_on_every_node() -> None:
    for seed in range(3):
        c, _ = trading_run(seed)
        blob = state_of(c.log)
        result = final.check(c.history(), {"n1": blob, "n2": blob, "n3": blob})
        assert result.valid is True, result.anomalies
        assert result.stats["acknowledged_writes"] > 5


def test_a_node_that_lost_an_acknowledged_order() -> None:
    c, placed = minimal()
    result = final.check(c.history(), {"n1": state_of(c.log), "n2": state_of(c.log[:-1])})
    assert result.kinds() == {"lost_write"}
    assert len(result.anomalies) == 1
    assert result.anomalies[0]["op_indexes"] == [placed.history["complete"].index]
    assert "n2" in result.anomalies[0]["message"]


def test_a_lost_cancel_leaves_the_order_resting() -> None:
    c, ops = trading_run()
    cancel = ops["cancel"]
    without = [cmd for n, cmd in enumerate(c.log, 1) if n != cancel.cmd_index]
    result = final.check(c.history(), {"n1": state_of(without)})
    assert result.kinds() == {"lost_write"}
    assert result.anomalies[0]["op_indexes"] == [cancel.history["complete"].index]


def test_an_acknowledged_order_id_held_by_another_order() -> None:
    """The client order id is known, but for another order than the one acknowledged: an
    order placed before it (here under another client order id) shifted the ids."""
    c, placed = minimal()
    shifted = state_of([*c.log[:-1], dict(c.log[-1], client_order_id="x"), *c.log[-1:]])
    result = final.check(c.history(), {"n1": shifted})
    assert result.kinds() == {"replaced_write"}
    assert result.anomalies[0]["op_indexes"] == [placed.history["complete"].index]


def test_without_final_states_it_says_unknown() -> None:
    c, _ = minimal()
    assert final.check(c.history(), {}).valid == UNKNOWN
