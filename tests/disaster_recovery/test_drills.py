"""The drills' verdicts: the pure check on hand-made outcomes (each kind of wrong flips it), and
one short run of each drill through the command line, as an SRE runs it (`--json`, exit code),
with every process it started gone afterwards, also when it is interrupted (SIGTERM)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.workload import DEFAULT_MARKET, Outcome, wait_for
from disaster_recovery.drills import (
    DrillResult,
    Holdings,
    check_orders,
    format_report,
    longest_gap,
    order_failures,
    pid_alive,
)
from statemachine import Exchange
from statemachine.snapshot import decode

ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------- check_orders


def place(
    n: int, result: str = "acked", order_id: int | None = None, account: str = "a"
) -> Outcome:
    """The n-th place of the load; acked as order n unless told otherwise."""
    if order_id is None and result == "acked":
        order_id = n
    return Outcome(n, "place", account, f"c{n}", 0.0, 0.1, result, order_id=order_id)


def cancel(n: int, result: str = "acked") -> Outcome:
    return Outcome(100 + n, "cancel", "a", f"c{n}", 0.0, 0.1, result)


def node(coids: dict[str, int], open_ids: set[int] | None = None) -> Holdings:
    """A member that holds `coids` (account "a"), having given out the ids up to the highest."""
    return Holdings({"a": dict(coids)}, open_ids or set(), max(coids.values(), default=0) + 1)


def everywhere(holdings: Holdings) -> dict[str, Holdings]:
    return {"n1": holdings, "n2": holdings, "n3": holdings}


def test_a_clean_run_passes() -> None:
    outcomes = [place(1), place(2), place(3, "rejected"), cancel(1), place(4, "refused")]
    found = check_orders(outcomes, everywhere(node({"c1": 1, "c2": 2}, open_ids={2})))
    assert order_failures(found) == []
    assert (found["acked_orders"], found["rejected_orders"], found["refused_orders"]) == (2, 1, 1)
    assert (found["lost_orders"], found["duplicated_orders"], found["acked_cancels"]) == (0, 0, 1)


def test_an_acknowledged_order_missing_on_one_member_is_lost() -> None:
    whole = node({"c1": 1, "c2": 2})
    held = {"n1": whole, "n2": whole, "n3": node({"c1": 1})}
    found = check_orders([place(1), place(2)], held)
    assert found["lost_orders"] == 1
    assert found["lost_samples"] == [{"client_order_id": "c2", "missing_on": ["n3"]}]
    assert "1 acknowledged orders lost" in order_failures(found)


@pytest.mark.parametrize("acked_as", [1, 2])
def test_an_order_applied_twice_is_found_whichever_copy_was_acknowledged(acked_as: int) -> None:
    # c1 applied as order 1, then again as order 2 (its duplicate check bypassed): the exchange
    # maps c1 to the last copy, and order 1 belongs to no client_order_id.
    twice = Holdings({"a": {"c1": 2, "c2": 3}}, set(), 4)
    found = check_orders([place(1, order_id=acked_as), place(2, order_id=3)], everywhere(twice))
    assert found["duplicated_orders"] == 1
    assert found["duplicated_samples"] == [{"node": "n1", "order_id": 1}]
    assert "1 orders applied twice" in order_failures(found)[0]
    # Told order 1 but held as order 2: a wrong answer too.
    assert found["mismatched_orders"] == (1 if acked_as == 1 else 0)


def test_orders_given_out_before_the_load_are_not_its_copies() -> None:
    held = Holdings({"a": {"c1": 5}}, set(), 6)  # 1-4: orders of before, without client ids
    assert check_orders([place(1, order_id=5)], everywhere(held), 5)["duplicated_orders"] == 0
    assert check_orders([place(1, order_id=5)], everywhere(held))["duplicated_orders"] == 4


def test_a_copy_on_one_member_only_counts_too() -> None:
    clean = node({"c1": 1})
    copied = Holdings({"a": {"c1": 2}}, set(), 3)
    found = check_orders([place(1, order_id=None)], {"n1": clean, "n2": clean, "n3": copied})
    assert found["duplicated_orders"] == 1
    assert found["lookups_disagree"] == 1


def test_orders_of_other_accounts_are_not_orphans() -> None:
    held = Holdings({"a": {"c1": 1, "c2": 3}, "b": {"theirs": 2}}, set(), 4)
    found = check_orders([place(1), place(2, order_id=3)], everywhere(held))
    assert found["duplicated_orders"] == 0
    assert order_failures(found) == []


@pytest.mark.parametrize("applied", [True, False])
def test_an_unknown_outcome_resolves_either_way(applied: bool) -> None:
    held = node({"c1": 1, "c2": 2} if applied else {"c1": 1})
    found = check_orders([place(1), place(2, "unknown")], everywhere(held))
    assert found["unknown_orders"] == 1
    assert (found["unknown_applied"], found["unknown_not_applied"]) == (
        int(applied),
        int(not applied),
    )
    assert order_failures(found) == []


def test_an_unknown_outcome_held_by_some_members_only_fails() -> None:
    found = check_orders(
        [place(1), place(2, "unknown")],
        {"n1": node({"c1": 1, "c2": 2}), "n2": node({"c1": 1}), "n3": node({"c1": 1})},
    )
    assert "1 unknown outcomes held by some members only" in order_failures(found)


@pytest.mark.parametrize("result", ["refused", "rejected"])
def test_a_definite_no_that_was_applied_anyway_fails(result: str) -> None:
    found = check_orders([place(1), place(2, result)], everywhere(node({"c1": 1, "c2": 2})))
    assert found[f"{result}_but_present"] == 1
    assert len(order_failures(found)) == 1


def test_an_acknowledged_cancel_whose_order_still_rests_fails() -> None:
    found = check_orders([place(1), cancel(1)], everywhere(node({"c1": 1}, open_ids={1})))
    assert found["lost_cancels"] == 1
    assert "1 acknowledged cancels whose order is still open" in order_failures(found)


def test_nothing_acknowledged_proves_nothing() -> None:
    found = check_orders([place(1, "refused")], everywhere(node({})))
    assert order_failures(found) == ["no order was acknowledged: the drill proved nothing"]


def test_holdings_of_a_real_state_and_of_one_with_a_copy() -> None:
    ex = Exchange()
    ex.apply({"op": "create_market", "ts": 1, **DEFAULT_MARKET})
    for ts, asset in ((2, "LG"), (3, "USD")):
        ex.apply({"op": "deposit", "ts": ts, "account": "a", "asset": asset, "amount": 10**9,
                  "ref": asset})  # fmt: skip
    for i in (1, 2, 3):
        order = {"op": "place", "ts": 3 + i, "account": "a", "market": "LG-USD", "side": "buy",
                 "type": "limit", "price": 1000, "qty": 1, "client_order_id": f"c{i}"}  # fmt: skip
        assert ex.apply(order)[0]["type"] == "accepted"
    outcomes = [place(1), place(2), place(3)]
    held = Holdings.of(decode(ex.snapshot()))
    assert order_failures(check_orders(outcomes, everywhere(held))) == []
    # As if c2 had been applied a second time as order 3 (and c3 never): order 2 is orphaned.
    coids = ex.state.coids["a"]
    coids["c2"] = coids.pop("c3")
    found = check_orders(outcomes[:2], everywhere(Holdings.of(ex.state)))
    assert (found["duplicated_orders"], found["mismatched_orders"]) == (1, 1)


# ---------------------------------------------------------------------- the other pure parts


def test_longest_gap() -> None:
    assert longest_gap([], 10.0, 13.0) == 3.0
    assert longest_gap([11.0, 11.5, 12.9], 10.0, 13.0) == pytest.approx(1.4)
    assert longest_gap([9.0, 10.5, 14.0], 10.0, 13.0) == 2.5  # only the acks inside count
    assert longest_gap([10.0, 13.0], 10.0, 13.0) == 3.0  # ... strictly inside
    assert longest_gap([10.2, 10.4, 10.6], 10.0, 13.0) == pytest.approx(2.4)


def test_json_starts_with_the_design_contract() -> None:
    result = DrillResult("failover", ok=True, rto_s=0.2345, state_hashes_equal=True)
    result.figures.update({"nodes": 3, "acked_orders": 10, "lost_orders": 0, "extra": 1})
    data = result.as_json()
    assert list(data)[:7] == [
        "drill", "ok", "rto_s", "acked_orders", "lost_orders", "duplicated_orders",
        "state_hashes_equal",
    ]  # fmt: skip
    assert (data["rto_s"], data["acked_orders"], data["duplicated_orders"]) == (0.234, 10, 0)
    assert data["extra"] == 1 and list(data)[-4:] == [
        "failures",
        "warnings",
        "pids",
        "pids_running",
    ]


def report_data(drill: str, **figures: object) -> dict:
    """An `as_json()` of a finished drill on a throwaway cluster, with these figures."""
    result = DrillResult(drill, ok=True, rto_s=0.25, state_hashes_equal=True, pids=[1, 2, 3])
    result.figures.update(
        {
            "nodes": 3, "cluster": None, "duration_s": 6.1, "ops_sent": 300, "acked_orders": 250,
            "acked_as_duplicate": 1, "rejected_orders": 9, "refused_orders": 2,
            "unknown_orders": 3, "unknown_applied": 2, "unknown_not_applied": 1, "trades": 80,
            "latency_ms_p50": 6.5, "lost_orders": 0, "duplicated_orders": 0, "lost_cancels": 0,
            "cmd_index": 321, "members": ["n1", "n2", "n3"], **figures,
        }
    )  # fmt: skip
    return result.as_json()


def test_format_report_of_each_drill() -> None:
    failover = format_report(
        report_data(
            "failover",
            rto_median_s=0.2,
            rounds=[
                {
                    "round": 1,
                    "killed": "n1",
                    "term_before": 1,
                    "new_leader": "n2",
                    "term_after": 2,
                    "rto_s": 0.25,
                    "caught_up_s": 1.2,
                }
            ],
        )
    )
    assert failover.splitlines()[0] == "drill failover: PASS (a throwaway 3-node cluster, 6.1 s)"
    assert "RTO 250 ms (worst of 1 rounds" in failover
    assert "round 1: killed n1 (term 1) -> n2 (term 2) in 250 ms" in failover
    assert "250 acknowledged" in failover and "lost 0, duplicated 0" in failover
    assert "(2 applied, 1 not)" in failover
    membership = format_report(
        report_data(
            "membership",
            added="n4",
            add_s=0.1,
            caught_up_s=0.7,
            removed="n1",
            remove_s=0.2,
            removed_process_stopped=True,
            ack_gap_limit_s=3.0,
        )
    )
    assert "added n4" in membership and "removed n1" in membership
    assert "longest pause between acknowledgements): 250 ms" in membership
    data = report_data(
        "quorum-loss", killed=["n1", "n3"], survivors=["n2"], outage_s=2.0,
        survivor_stepped_down_s=None, writes_during_outage=12, refused_during_outage=6,
        unknown_during_outage=6, acknowledged_during_outage=0, reads_during_outage=2,
        reads_answered_during_outage=0, leader_after="n2", leader_elected_s=0.9,
    )  # fmt: skip
    data.update(ok=False, failures=["1 acknowledged orders lost"], warnings=["slow"])
    quorum = format_report(data)
    assert quorum.startswith("drill quorum-loss: FAIL")
    assert "survivor n2 never stepped down" in quorum
    assert "12 writes: 6 refused, 6 unknown, 0 acknowledged" in quorum
    assert "  warning: slow" in quorum and quorum.endswith("  FAILED: 1 acknowledged orders lost")
    assert "still running: 0" in quorum
    restore = DrillResult("restore", rto_s=1.14, state_hashes_equal=True, pids=[1, 2])
    restore.figures.update(
        nodes=3, cluster=None, duration_s=5.7, acked_orders=184, lost_orders=0,
        duplicated_orders=0, restore_s=0.02, rpo_orders=26, rpo_s=0.42, unknown_orders=0,
        orders_past_the_restore_point=0, restored_hash_on_every_node=True,
        restored_cmd_index=167, restored_seq=483, backup_id="B1", segments_read=3,
        last_segment_cut_before_disaster_s=-0.01,
    )  # fmt: skip
    restore.fail("2 acknowledged orders at or before the restored seq 483 are not in the book")
    restored = format_report(restore.as_json())
    assert restored.startswith("drill restore: FAIL (a throwaway 3-node cluster, 5.7 s)")
    assert "from backup B1 and 3 archived segments to cmd_index 167 (seq 483)" in restored
    assert "RTO 1.14 s" in restored and "RPO 26 orders" in restored
    assert "the last archived segment was cut 0.01 s after it" in restored
    assert "still running: 0" in restored
    assert restored.endswith(
        "  FAILED: 2 acknowledged orders at or before the restored seq 483 are not in the book"
    )


# ---------------------------------------------------------------------- the drills, for real


def drill(*args: str) -> dict:
    """Run `quorumbook drill ARGS --json` as a script would: one JSON object, exit 0 on a pass."""
    done = subprocess.run(
        [sys.executable, "-m", "cluster", "drill", *args, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.stdout, done.stderr
    data = json.loads(done.stdout)
    assert done.returncode == (0 if data["ok"] else 1), done.stderr
    return data


def assert_passed(data: dict, name: str) -> None:
    assert data["drill"] == name
    assert data["ok"] is True, data["failures"]
    assert isinstance(data["rto_s"], float) and data["rto_s"] >= 0
    assert data["acked_orders"] > 0
    assert data["lost_orders"] == 0
    assert data["duplicated_orders"] == 0
    assert data["state_hashes_equal"] is True
    assert data["pids"] and data["pids_running"] == []
    assert not [pid for pid in data["pids"] if pid_alive(pid)]


@pytest.mark.slow
def test_failover_drill() -> None:
    data = drill("failover", "--nodes", "3", "--rounds", "1", "--interval", "0.5", "--rate", "30")
    assert_passed(data, "failover")
    (round_1,) = data["rounds"]
    assert round_1["new_leader"] not in (None, round_1["killed"])
    assert round_1["term_after"] > round_1["term_before"]
    assert data["rto_s"] == round_1["rto_s"] and len(data["pids"]) == 4  # 3 + the restart


@pytest.mark.slow
def test_membership_drill() -> None:
    data = drill("membership", "--nodes", "3", "--rate", "30")
    assert_passed(data, "membership")
    assert data["removed_process_stopped"] is True
    expected = sorted({"n1", "n2", "n3", data["added"]} - {data["removed"]})
    assert data["members"] == data["leader_sees_members"] == expected
    assert data["rto_s"] <= data["ack_gap_limit_s"]


@pytest.mark.slow
def test_quorum_loss_drill() -> None:
    data = drill("quorum-loss", "--nodes", "3", "--outage", "1.5", "--rate", "30")
    assert_passed(data, "quorum-loss")
    assert len(data["killed"]) == 2 and len(data["survivors"]) == 1
    assert data["writes_during_outage"] > 0
    assert data["acknowledged_during_outage"] == 0
    assert data["reads_during_outage"] > 0 and data["reads_answered_during_outage"] == 0
    assert data["lost_before_outage"] == 0


@pytest.mark.slow
def test_sigterm_stops_every_process_the_drill_started() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster", "drill", "failover", "--nodes", "3", "--rounds", "3",
         "--rate", "30", "--keep"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    root = None
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # interrupt it mid-round: a node killed, not yet restarted
            found = re.search(r"cluster up in (\S+)", line)
            root = Path(found.group(1)) if found else root
            if "round 1: next order acknowledged" in line:
                break
        else:
            pytest.fail("the drill ended before its first round")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130
        assert "drill interrupted" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]
    assert root is not None
    listed = json.loads((root / "cluster" / "cluster.json").read_text())["nodes"]
    assert len(listed) == 3 and not [n["pid"] for n in listed if pid_alive(n["pid"])]
    # A node the drill was starting at the moment of the signal may not be recorded yet: it
    # was started with the launcher's pid to watch, and stops by itself once that is gone.
    wait_for(
        lambda: not [pid for pid in running_pids() if str(root) in cmdline(pid)],
        10,
        "every process of the drill to be gone",
    )
    shutil.rmtree(root)


def running_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and pid_alive(int(p))]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
