"""The run report: a synthetic 20 s history with a kill and a partition, checked and not."""

from __future__ import annotations

import json
import random
import struct
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from jepsen import report

NS = 1_000_000_000
FS = ("place", "cancel", "deposit", "read_book", "read_balance")
KILL_S = (5.0, 8.0)
PARTITION_S = (11.0, 15.0)
TIMEOUT_S = 1.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_history(seed: int = 7, duration_s: float = 20.0) -> list[dict[str, Any]]:
    """Five logical clients for `duration_s`; slow and failing ops inside the nemesis windows.

    A client whose op ends info is retired and replaced by a new process, as in Jepsen.
    """
    rng = random.Random(seed)
    pairs = []  # (invoke time, completion time, process, f, outcome, value)
    for slot in range(5):
        process, t = slot, rng.uniform(0, 0.1)
        while t < duration_s:
            f = rng.choice(FS)
            value = {"market": "BTC-USD", "qty": rng.randint(1, 9)}
            latency = rng.uniform(0.002, 0.04)
            outcome = "ok"
            if KILL_S[0] <= t < KILL_S[1]:
                latency = rng.uniform(0.1, 0.9)
                outcome = rng.choice(("ok", "ok", "fail", "info"))
            elif PARTITION_S[0] <= t < PARTITION_S[1]:
                outcome = rng.choice(("ok", "fail", "info"))
            if outcome == "info":
                latency = TIMEOUT_S
            pairs.append((t, t + latency, process, f, outcome, value))
            t += latency + rng.uniform(0.2, 0.4)
            if outcome == "info":
                process += 5
    events: list[tuple[float, int, dict[str, Any]]] = []
    for number, (start, end, process, f, outcome, value) in enumerate(pairs):
        events.append(
            (
                start,
                0,
                {"type": "invoke", "process": process, "f": f, "value": value, "pair": number},
            )
        )
        completion = {"type": outcome, "process": process, "f": f, "pair": number}
        completion["value"] = {**value, "order_id": number} if outcome == "ok" else None
        completion["error"] = (
            {"code": "not_leader", "message": "n2 is not the leader"} if outcome == "fail" else None
        )
        completion["error"] = (
            {"code": "timeout", "message": "no answer in 1 s"}
            if outcome == "info"
            else completion["error"]
        )
        events.append((end, 1, completion))
    for kind, (start, stop), details in (
        ("kill", KILL_S, {"nodes": ["n2"]}),
        ("partition", PARTITION_S, {"shape": "halves", "groups": [["n1", "n2"], ["n3"]]}),
    ):
        events.append(
            (
                start,
                0,
                {
                    "type": "info",
                    "process": "nemesis",
                    "f": kind,
                    "value": {"phase": "start", **details},
                },
            )
        )
        events.append(
            (stop, 0, {"type": "info", "process": "nemesis", "f": kind, "value": {"phase": "stop"}})
        )
    history = []
    invoke_of_pair: dict[int, int] = {}
    for index, (at, _, op) in enumerate(sorted(events, key=lambda e: (e[0], e[1]))):
        pair = op.pop("pair", None)
        op.update(index=index, time=int(at * NS), node=None, invoke_index=None)
        op.setdefault("error", None)
        if op["process"] != "nemesis" and op["type"] != "invoke":
            op["node"] = "n1"
            op["invoke_index"] = invoke_of_pair[pair]
        elif pair is not None:
            invoke_of_pair[pair] = index
        history.append(op)
    return history


def completions(history: list[dict[str, Any]], outcome: str) -> list[dict[str, Any]]:
    return [op for op in history if op["type"] == outcome and op["process"] != "nemesis"]


def synthetic_results(history: list[dict[str, Any]]) -> dict[str, Any]:
    stale = completions(history, "ok")[10]
    lost = completions(history, "info")[:3]
    return {
        "valid": False,
        "checkers": {
            "linearizable-reads": {
                "name": "linearizable-reads",
                "valid": False,
                "anomalies": [
                    {
                        "kind": "stale-read",
                        "op_indexes": [stale["invoke_index"], stale["index"]],
                        "message": "read saw cmd_index 40 outside its window [41, 44]",
                    }
                ],
                "stats": {"reads": 120},
            },
            "sequencer": {
                "name": "sequencer",
                "valid": False,
                "anomalies": [
                    {
                        "kind": "duplicate-info",
                        "op_indexes": [op["index"]],
                        "message": "applied twice",
                    }
                    for op in lost
                ],
                "stats": {"writes": 300},
            },
            "conservation": {"name": "conservation", "valid": True, "anomalies": [], "stats": {}},
        },
        "run": {
            "nodes": ["n1", "n2", "n3"],
            "seed": 7,
            "time_s": 20,
            "rate": 20,
            "nemeses": ["kill", "partition"],
            "options": {},
        },
    }


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.hrefs: list[str] = []
        self.imgs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if attributes.get("id"):
            self.ids.append(attributes["id"] or "")
        if tag == "a" and attributes.get("href"):
            self.hrefs.append(attributes["href"] or "")
        if tag == "img":
            self.imgs.append(attributes.get("src") or "")


def anchors(page: str) -> _Anchors:
    parser = _Anchors()
    parser.feed(page)
    return parser


@pytest.fixture(scope="module")
def checked_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, list[dict[str, Any]], dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("run")
    history = synthetic_history()
    results = synthetic_results(history)
    (run_dir / "history.jsonl").write_text("".join(json.dumps(op) + "\n" for op in history))
    (run_dir / "results.json").write_text(json.dumps(results))
    index = report.write_report(run_dir)  # both read from the files
    assert index == run_dir / "index.html"
    return run_dir, history, results


def test_the_synthetic_history_is_what_the_tests_need() -> None:
    history = synthetic_history()
    assert 200 <= len(history) <= 1000
    assert completions(history, "fail") and len(completions(history, "info")) >= 3
    assert history[-1]["time"] >= 19 * NS


def test_report_writes_the_page_and_valid_pngs(checked_run) -> None:
    run_dir, _, _ = checked_run
    page = (run_dir / "index.html").read_text(encoding="utf-8")
    for name in (report.LATENCY_PNG, report.THROUGHPUT_PNG):
        data = (run_dir / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        assert len(data) > 10_000, name  # an empty canvas compresses to a few KB
        width, height = struct.unpack(">II", data[16:24])  # IHDR
        assert width >= 800 and height >= 300, (name, width, height)
        assert name in anchors(page).imgs  # by relative name: the run directory moves whole


def test_page_names_verdict_anomalies_and_links_to_ops_that_exist(checked_run) -> None:
    run_dir, history, results = checked_run
    page = (run_dir / "index.html").read_text(encoding="utf-8")
    found = anchors(page)
    assert 'class="verdict invalid"' in page and ">INVALID<" in page
    assert len(found.ids) == len(set(found.ids)), "ids are unique"
    local = [href.removeprefix("#") for href in found.hrefs if href.startswith("#")]
    assert local and set(local) <= set(found.ids), "every link has its anchor"
    by_index = {op["index"]: op for op in history}
    for checker in results["checkers"].values():
        for anomaly in checker["anomalies"]:
            assert f">{anomaly['kind']} (" in page
            for index in anomaly["op_indexes"]:
                assert f'href="#op-{index}"' in page and f"op-{index}" in found.ids
                # the op's invoke/completion pair is shown and listed too
                op = by_index[index]
                pair = op["invoke_index"] if op["type"] != "invoke" else None
                if pair is not None:
                    assert f"op-{pair}" in found.ids
    stale = results["checkers"]["linearizable-reads"]["anomalies"][0]["op_indexes"]
    for index in stale:  # both halves of one pair named: each shown once, both highlighted
        assert page.count(f'<tr class="ref"><td><a href="#op-{index}">') == 1
    for name in results["checkers"]:
        assert f"<td>{name}</td>" in page
    for row in ("kill", "partition", "5.000", "8.000", "11.000", "15.000", "halves"):
        assert row in page  # the nemesis timeline
    for f in FS:
        assert f"<td>{f}</td>" in page  # the quantile table
    assert "p99" in page and "seed" in page


def test_values_from_the_network_are_escaped(tmp_path: Path) -> None:
    history = synthetic_history(seed=3)
    evil = "<script>alert(1)</script>"
    target = completions(history, "ok")[0]
    # a lone surrogate is valid JSON but not encodable as UTF-8: it must not stop the report
    target["value"] = {"note": evil, "quote": '"><img src=x onerror=alert(1)>', "lone": "\ud800"}
    target["node"] = evil
    results = {
        "valid": "unknown",
        "checkers": {
            evil: {
                "name": evil,
                "valid": "unknown",
                "anomalies": [
                    {"kind": evil, "op_indexes": [target["index"], 10**9], "message": evil}
                ],
                "stats": {"x": evil},
            }
        },
        "run": {"nodes": [evil], "options": {"x": evil}},
    }
    page = report.write_report(tmp_path, history, results).read_text(encoding="utf-8")
    assert "<script" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert ">unknown<" in page
    assert f'id="op-{target["index"]}"' in page and "not in the history" in page
    assert "op-1000000000" not in anchors(page).ids + anchors(page).hrefs


def test_a_run_without_results_is_not_checked(tmp_path: Path, capsys) -> None:
    history = synthetic_history(seed=5, duration_s=4.0)
    (tmp_path / "history.jsonl").write_text("\n".join(json.dumps(op) for op in history) + "\n")
    assert report.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "index.html")
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert 'class="verdict not-checked"' in page and "not checked" in page
    assert (tmp_path / report.LATENCY_PNG).read_bytes()[:8] == PNG_SIGNATURE


def test_pairing_by_process_and_ops_never_completed() -> None:
    history = [
        {"index": 0, "type": "invoke", "process": 0, "f": "place", "time": 0},
        {"index": 1, "type": "invoke", "process": 1, "f": "place", "time": 1 * NS},
        {"index": 2, "type": "ok", "process": 0, "f": "place", "time": 2 * NS},  # no invoke_index
        {
            "index": 3,
            "type": "info",
            "process": "nemesis",
            "f": "pause",
            "value": {"phase": "start"},
            "time": 3 * NS,
        },
        {
            "index": 4,
            "type": "info",
            "process": "nemesis",
            "f": "heal",
            "value": None,
            "time": 4 * NS,
        },
        {
            "index": 5,
            "type": "fail",
            "process": 2,
            "f": "cancel",
            "time": 5 * NS,
            "invoke_index": 0,
        },
    ]
    ops = report.pair_ops(history)
    assert [(op.invoke["index"], op.outcome, op.end_s) for op in ops] == [
        (0, "ok", 2.0),
        (1, "info", 5.0),
    ]
    assert ops[0].latency_ms == 2000.0
    spans = report.nemesis_spans(history)
    assert [(s.kind, s.start_s, s.stop_s, s.stop is None) for s in spans] == [
        ("pause", 3.0, 5.0, True),  # never stopped: open until the history's end
        ("heal", 4.0, 4.0, False),  # no phase: an instant
    ]
    buckets, counts = report.throughput(ops)
    assert buckets == 3 and counts["ok"] == [0, 0, 1] and counts["info"] == [0, 0, 0]


def test_latency_quantiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [report.quantile(values, q) for q in (0.5, 0.95, 0.99, 1.0)] == [50.0, 95.0, 99.0, 100.0]
    assert report.quantile([7.0], 0.99) == 7.0
    history = synthetic_history()
    rows = {row.f: row for row in report.latency_table(report.pair_ops(history))}
    assert list(rows) == [f for f in report.OP_ORDER if f in FS]
    invokes = [op for op in history if op["type"] == "invoke"]
    assert sum(sum(row.counts.values()) for row in rows.values()) == len(invokes)
    for row in rows.values():
        assert row.ok_ms is not None
        assert row.ok_ms["p50"] <= row.ok_ms["p95"] <= row.ok_ms["p99"] <= row.ok_ms["max"]
