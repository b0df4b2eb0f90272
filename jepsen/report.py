"""A run's report: `RUN/index.html` and the PNGs it shows, from the history and the verdicts.

Reads `history.jsonl` (client ops and nemesis events) and `results.json` (the checkers'
verdicts; a run not checked yet has none and the report says so). The page opens with the
verdict and every anomaly, each with the ops that show it, linked to those ops in full at the
bottom; then latency and throughput over time with the nemesis windows shaded, a latency
quantile table per op and the nemesis timeline.

Everything in a history came over the network, so every value is escaped on the page, and
the figures only ever label ops and nemeses by name. The work is split as elsewhere: pure
functions turn the history into rows (`pair_ops`, `nemesis_spans`, `throughput`,
`latency_table`, `render_html`); `write_report` reads and writes the files.

    python -m jepsen.report store/RUN
"""

from __future__ import annotations

import argparse
import html
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

HISTORY_FILE = "history.jsonl"
RESULTS_FILE = "results.json"
INDEX_FILE = "index.html"
LATENCY_PNG = "latency.png"
THROUGHPUT_PNG = "throughput.png"

NEMESIS = "nemesis"
OUTCOMES = ("ok", "fail", "info")
# The workload's ops in the order a reader looks for them; ops not listed follow by name.
OP_ORDER = (
    "place",
    "cancel",
    "deposit",
    "withdraw",
    "read_order",
    "read_book",
    "read_balance",
    "read_final",
)
OUTCOME_STYLE = {  # Jepsen's colours: ok blue, fail red, info (unknown) orange
    "ok": {"color": "#2b7bba", "marker": "o"},
    "fail": {"color": "#d62728", "marker": "x"},
    "info": {"color": "#ff9f1c", "marker": "^"},
}
NEMESIS_COLOURS = {  # pale, so the op markers stay readable on top of them
    "kill": "#fbb4ae",
    "pause": "#b3cde3",
    "partition": "#ccebc5",
    "clock": "#decbe4",
    "membership": "#fed9a6",
    "restart-all": "#e5d8bd",
    "data": "#fddaec",
    "heal": "#d9d9d9",
}
SPARE_COLOURS = ("#ffffb3", "#bebada", "#80b1d3", "#b3de69", "#bc80bd", "#ffed6f")

ANOMALIES_SHOWN = 5  # per kind: the first few; the count says how many there are
OP_ROWS_SHOWN = 8  # per anomaly: ops shown as rows (with their pairs); all are linked
OP_LINKS_SHOWN = 50  # per anomaly: beyond this only the count is given
VALUE_CHARS = 80  # a value or error in a table row; the ops section has them in full
DETAILS_CHARS = 300
LATENCY_FLOOR_MS = 0.01  # the log axis cannot show 0: an op answered within 10 µs sits here


# --- the history as rows ------------------------------------------------------------------


@dataclass(frozen=True)
class ClientOp:
    """One client op: its invoke and its completion (None if the run ended first)."""

    invoke: dict[str, Any]
    completion: dict[str, Any] | None
    end_s: float  # the completion's time, or the history's end for an op never completed

    @property
    def f(self) -> str:
        return str(self.invoke.get("f"))

    @property
    def outcome(self) -> str:
        # Never completed is indefinite: Jepsen completes such ops as info too.
        if self.completion is None:
            return "info"
        return str(self.completion.get("type"))

    @property
    def start_s(self) -> float:
        return _seconds(self.invoke)

    @property
    def latency_ms(self) -> float:
        return max((self.end_s - self.start_s) * 1000.0, 0.0)


@dataclass(frozen=True)
class NemesisSpan:
    """A nemesis from its start event to its stop event; None where the history lacks one."""

    kind: str
    start: dict[str, Any] | None
    stop: dict[str, Any] | None
    start_s: float
    stop_s: float  # the history's end when the nemesis never stopped


def _seconds(op: dict[str, Any]) -> float:
    return int(op.get("time") or 0) / 1e9


def _is_nemesis(op: dict[str, Any]) -> bool:
    return op.get("process") == NEMESIS


def history_end_s(history: Sequence[dict[str, Any]]) -> float:
    return max((_seconds(op) for op in history), default=0.0)


def pair_ops(history: Sequence[dict[str, Any]]) -> list[ClientOp]:
    """Client ops in invoke order, each invoke with its completion.

    A completion names its invoke by `invoke_index`; one without it completes its process's
    open invoke (a process runs one op at a time), as in Jepsen.
    """
    end_s = history_end_s(history)
    by_index: dict[Any, dict[str, Any]] = {}
    open_by_process: dict[Any, dict[str, Any]] = {}
    completion_of: dict[Any, dict[str, Any]] = {}
    invokes: list[dict[str, Any]] = []
    for op in history:
        if _is_nemesis(op):
            continue
        if op.get("type") == "invoke":
            invokes.append(op)
            by_index[op.get("index")] = op
            open_by_process[op.get("process")] = op
            continue
        invoke = by_index.get(op.get("invoke_index"))
        if invoke is None:
            invoke = open_by_process.get(op.get("process"))
        if invoke is None or invoke.get("index") in completion_of:
            continue  # a completion of nothing: the checkers judge the history, not the report
        completion_of[invoke.get("index")] = op
        if open_by_process.get(op.get("process")) is invoke:
            del open_by_process[op.get("process")]
    ops = []
    for invoke in invokes:
        completion = completion_of.get(invoke.get("index"))
        ops.append(
            ClientOp(invoke, completion, _seconds(completion) if completion is not None else end_s)
        )
    return ops


def nemesis_spans(history: Sequence[dict[str, Any]]) -> list[NemesisSpan]:
    """Each nemesis window, in start order: a stop closes the earliest open start of its kind."""
    end_s = history_end_s(history)
    spans: list[NemesisSpan] = []
    open_starts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for op in history:
        if not _is_nemesis(op):
            continue
        kind = str(op.get("f"))
        value = op.get("value")
        phase = value.get("phase") if isinstance(value, dict) else None
        if phase == "start":
            open_starts[kind].append(op)
        elif phase == "stop" and open_starts[kind]:
            start = open_starts[kind].pop(0)
            spans.append(NemesisSpan(kind, start, op, _seconds(start), _seconds(op)))
        elif phase == "stop":  # a stop with no start seen: shown as an instant
            spans.append(NemesisSpan(kind, None, op, _seconds(op), _seconds(op)))
        else:  # an event with no phase is an instant
            spans.append(NemesisSpan(kind, op, op, _seconds(op), _seconds(op)))
    for kind, starts in open_starts.items():
        spans += [NemesisSpan(kind, start, None, _seconds(start), end_s) for start in starts]
    return sorted(spans, key=lambda span: span.start_s)


def ordered_fs(fs: Iterable[str]) -> list[str]:
    present = set(fs)
    return [f for f in OP_ORDER if f in present] + sorted(present - set(OP_ORDER))


def throughput(ops: Sequence[ClientOp]) -> tuple[int, dict[str, list[int]]]:
    """Completions per 1 s bucket of their completion time, per outcome.

    Only real completions count: an op the run never completed has no completion time.
    """
    completed = [op for op in ops if op.completion is not None and op.outcome in OUTCOMES]
    buckets = max((int(op.end_s) for op in completed), default=-1) + 1
    counts = {outcome: [0] * buckets for outcome in OUTCOMES}
    for op in completed:
        counts[op.outcome][int(op.end_s)] += 1
    return buckets, counts


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    assert sorted_values, "quantile of no values"
    rank = max(math.ceil(q * len(sorted_values)), 1)
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class LatencyRow:
    f: str
    counts: dict[str, int]  # per outcome
    ok_ms: dict[str, float] | None  # p50, p95, p99, max of the ok ops; None without any


def latency_table(ops: Sequence[ClientOp]) -> list[LatencyRow]:
    """Per op: outcome counts, and latency quantiles of its ok ops.

    Quantiles are of ok ops only: a fail is often a quick refusal and an info's latency is
    the client's timeout, and either would blur how long the service takes to do the work.
    """
    by_f: dict[str, list[ClientOp]] = defaultdict(list)
    for op in ops:
        by_f[op.f].append(op)
    rows = []
    for f in ordered_fs(by_f):
        counts = Counter(op.outcome for op in by_f[f])
        ok = sorted(op.latency_ms for op in by_f[f] if op.outcome == "ok")
        quantiles = None
        if ok:
            quantiles = {
                "p50": quantile(ok, 0.50),
                "p95": quantile(ok, 0.95),
                "p99": quantile(ok, 0.99),
                "max": ok[-1],
            }
        rows.append(LatencyRow(f, {o: counts.get(o, 0) for o in OUTCOMES}, quantiles))
    return rows


# --- figures --------------------------------------------------------------------------------


def nemesis_colours(spans: Sequence[NemesisSpan]) -> dict[str, str]:
    colours = {}
    spare = iter(SPARE_COLOURS * (len(spans) // len(SPARE_COLOURS) + 1))
    for span in spans:
        if span.kind not in colours:
            colours[span.kind] = NEMESIS_COLOURS.get(span.kind) or next(spare)
    return colours


def _label(text: str) -> str:
    # matplotlib reads $...$ as mathematics; a name from a history is only text.
    return text.replace("$", r"\$")


def _draw_bands(ax: Any, spans: Sequence[NemesisSpan], colours: dict[str, str]) -> None:
    for span in spans:
        colour = colours[span.kind]
        if span.stop_s > span.start_s:
            ax.axvspan(span.start_s, span.stop_s, color=colour, alpha=0.6, lw=0, zorder=0)
        # The edges go on top: stacked bars can cover a band's fill, never its start and stop.
        for edge_s in dict.fromkeys((span.start_s, span.stop_s)):
            ax.axvline(edge_s, color=colour, lw=1.5, ls="--", zorder=3)


def _band_handles(colours: dict[str, str]) -> list[Patch]:
    return [
        Patch(facecolor=colour, alpha=0.6, label=_label(f"nemesis: {kind}"))
        for kind, colour in colours.items()
    ]


def plot_latency(
    path: Path, ops: Sequence[ClientOp], spans: Sequence[NemesisSpan], end_s: float
) -> None:
    """One panel per op, latency (log ms) against invoke time, one marker per outcome."""
    fs = ordered_fs(op.f for op in ops) or ["(no client ops)"]
    colours = nemesis_colours(spans)
    fig = Figure(figsize=(11, 1.7 * len(fs) + 1.2), layout="constrained")
    axes = fig.subplots(len(fs), 1, sharex=True, squeeze=False)[:, 0]
    for ax, f in zip(axes, fs, strict=True):
        _draw_bands(ax, spans, colours)
        for outcome in OUTCOMES:
            points = [op for op in ops if op.f == f and op.outcome == outcome]
            if points:
                ax.scatter(
                    [op.start_s for op in points],
                    [max(op.latency_ms, LATENCY_FLOOR_MS) for op in points],
                    s=9,
                    linewidths=0.8,
                    rasterized=True,
                    **OUTCOME_STYLE[outcome],
                )
        ax.set_yscale("log")
        ax.set_ylabel(_label(f"{f}\nms"))
        ax.grid(True, which="major", alpha=0.3)
    axes[-1].set_xlim(0, max(end_s, 1.0))
    axes[-1].set_xlabel("invoke time (s since the run's start)")
    handles = [
        Line2D([], [], linestyle="", markersize=6, label=outcome, **OUTCOME_STYLE[outcome])
        for outcome in OUTCOMES
    ]
    fig.legend(
        handles=handles + _band_handles(colours),
        loc="outside upper center",
        ncol=min(len(handles) + len(colours), 6),
        frameon=False,
    )
    fig.savefig(path, dpi=100)


def plot_throughput(
    path: Path, ops: Sequence[ClientOp], spans: Sequence[NemesisSpan], end_s: float
) -> None:
    """Completions per second, stacked by outcome."""
    buckets, counts = throughput(ops)
    colours = nemesis_colours(spans)
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax = fig.subplots()
    _draw_bands(ax, spans, colours)
    seconds = list(range(buckets))
    bottom = [0] * buckets
    for outcome in OUTCOMES:
        ax.bar(
            seconds,
            counts[outcome],
            width=1.0,
            align="edge",
            bottom=bottom,
            color=OUTCOME_STYLE[outcome]["color"],
            alpha=0.85,  # the nemesis band behind shows through
            linewidth=0,
            label=outcome,
        )
        bottom = [b + c for b, c in zip(bottom, counts[outcome], strict=True)]
    ax.set_xlim(0, max(end_s, buckets, 1.0))
    ax.set_xlabel("completion time (s since the run's start)")
    ax.set_ylabel("completions / s")
    ax.grid(True, axis="y", alpha=0.3)
    handles = [Patch(color=OUTCOME_STYLE[o]["color"], label=o) for o in OUTCOMES]
    fig.legend(
        handles=handles + _band_handles(colours),
        loc="outside upper center",
        ncol=min(len(handles) + len(colours), 6),
        frameon=False,
    )
    fig.savefig(path, dpi=100)


# --- the page -------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.4em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font-family: ui-monospace, monospace; font-size: .85em; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; white-space: pre-wrap; }
.verdict { display: inline-block; font-size: 2.4em; font-weight: bold; padding: .2em .6em;
  border-radius: .2em; color: #fff; }
.valid { background: #2e8540; } .invalid { background: #c62828; }
.unknown { background: #e08a00; } .not-checked { background: #777; }
.tag { font-weight: bold; } .tag.valid, .tag.invalid, .tag.unknown, .tag.not-checked {
  color: #fff; padding: 0 .4em; border-radius: .2em; }
tr.ref td { background: #fff6d6; }
.anomaly { margin: .8em 0 1.2em; padding-left: .8em; border-left: 3px solid #c62828; }
img { max-width: 100%; }
.op { margin: 1em 0; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _json(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, sort_keys=indent is not None, ensure_ascii=False)


def _trim(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def verdict_word(valid: Any, checked: bool = True) -> tuple[str, str]:
    """(the word shown, its CSS class) for a checker's `valid`."""
    if not checked:
        return "not checked", "not-checked"
    if valid is True:
        return "valid", "valid"
    if valid is False:
        return "INVALID", "invalid"
    return "unknown", "unknown"


def _op_anchor(index: Any) -> str | None:
    # Only integer indexes become anchors: the id is then ours, never text from the history.
    return f"op-{index}" if isinstance(index, int) and not isinstance(index, bool) else None


def _op_link(index: Any, linked: set[int]) -> str:
    anchor = _op_anchor(index)
    if anchor is None:
        return f"<code>{_e(index)}</code>"
    linked.add(index)
    return f'<a href="#{anchor}">#{index}</a>'


def _meta_value(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_e(v if isinstance(v, str) else _json(v)) for v in value) or "—"
    if isinstance(value, dict):
        return f"<code>{_e(_json(value))}</code>"
    return _e(value)


class _Page:
    """Renders the page; collects the ops it links to so the ops section lists exactly those."""

    def __init__(
        self,
        title: str,
        history: Sequence[dict[str, Any]],
        results: dict[str, Any] | None,
    ) -> None:
        self.title = title
        self.history = history
        self.results = results
        self.ops = pair_ops(history)
        self.spans = nemesis_spans(history)
        self.end_s = history_end_s(history)
        self.by_index = {op.get("index"): op for op in history}
        self.pair_of: dict[Any, dict[str, Any]] = {}
        for op in self.ops:
            if op.completion is not None:
                self.pair_of[op.invoke.get("index")] = op.completion
                self.pair_of[op.completion.get("index")] = op.invoke
        self.linked: set[int] = set()

    def render(self) -> str:
        body = [
            self.summary(),
            self.anomalies(),
            self.figures(),
            self.latency(),
            self.nemeses(),
            self.op_section(),  # last: it lists the ops the sections above linked to
        ]
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{_e(self.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body)
            + "\n</body>\n</html>\n"
        )

    def summary(self) -> str:
        results = self.results
        word, css = verdict_word(
            results.get("valid") if results else None, checked=results is not None
        )
        out = [
            f"<h1>{_e(self.title)}</h1>",
            f'<p><span class="verdict {css}" id="verdict">{_e(word)}</span></p>',
        ]
        if results is None:
            out.append(f"<p>No <code>{RESULTS_FILE}</code>: this history has not been checked.</p>")
        run = (results or {}).get("run") or {}
        rows = (
            [(key, _meta_value(value)) for key, value in run.items()]
            if isinstance(run, dict)
            else []
        )
        invokes = len(self.ops)
        outcomes = Counter(op.outcome for op in self.ops)
        never = sum(op.completion is None for op in self.ops)
        rows += [
            ("history: client ops", _e(invokes)),
            (
                "history: outcomes",
                _e(", ".join(f"{o} {outcomes.get(o, 0)}" for o in OUTCOMES))
                + (_e(f" ({never} info never completed)") if never else ""),
            ),
            ("history: processes", _e(len({op.invoke.get("process") for op in self.ops}))),
            ("history: duration", _e(f"{self.end_s:.3f} s")),
            ("history: nemesis windows", _e(len(self.spans))),
        ]
        out.append("<h2>Run</h2><table>")
        out += [f"<tr><th>{_e(key)}</th><td>{value}</td></tr>" for key, value in rows]
        out.append("</table>")
        if results is not None:
            out.append(self.checkers())
        return "\n".join(out)

    def checkers(self) -> str:
        checkers = (self.results or {}).get("checkers") or {}
        out = [
            "<h2>Checkers</h2><table>",
            "<tr><th>checker</th><th>verdict</th><th>anomalies</th><th>stats</th></tr>",
        ]
        for key, checker in checkers.items():
            checker = checker if isinstance(checker, dict) else {}
            word, css = verdict_word(checker.get("valid"))
            stats = checker.get("stats")
            out.append(
                f"<tr><td>{_e(checker.get('name', key))}</td>"
                f'<td><span class="tag {css}">{_e(word)}</span></td>'
                f'<td class="num">{len(checker.get("anomalies") or [])}</td>'
                f"<td><code>{_e(_json(stats)) if stats else ''}</code></td></tr>"
            )
        out.append("</table>")
        problem = (self.results or {}).get("log_unavailable")
        if problem:
            out.append(
                "<p><b>No committed log</b> (the checkers that replay it say unknown): "
                f"<code>{_e(problem)}</code></p>"
            )
        return "\n".join(out)

    def anomalies_by_kind(self) -> dict[str, list[tuple[str, dict[str, Any]]]]:
        kinds: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        checkers = (self.results or {}).get("checkers") or {}
        for key, checker in checkers.items():
            if not isinstance(checker, dict):
                continue
            for anomaly in checker.get("anomalies") or []:
                if isinstance(anomaly, dict):
                    name = str(checker.get("name", key))
                    kinds.setdefault(str(anomaly.get("kind")), []).append((name, anomaly))
        return kinds

    def anomalies(self) -> str:
        if self.results is None:
            return "<h2>Anomalies</h2><p>Not checked.</p>"
        kinds = self.anomalies_by_kind()
        if not kinds:
            return "<h2>Anomalies</h2><p>None found.</p>"
        out = ["<h2>Anomalies</h2><table>", "<tr><th>kind</th><th>count</th><th>checkers</th></tr>"]
        for number, (kind, found) in enumerate(kinds.items(), 1):
            names = ", ".join(dict.fromkeys(name for name, _ in found))
            out.append(
                f'<tr><td><a href="#anomaly-{number}">{_e(kind)}</a></td>'
                f'<td class="num">{len(found)}</td><td>{_e(names)}</td></tr>'
            )
        out.append("</table>")
        for number, (kind, found) in enumerate(kinds.items(), 1):
            out.append(f'<h3 id="anomaly-{number}">{_e(kind)} ({len(found)})</h3>')
            for name, anomaly in found[:ANOMALIES_SHOWN]:
                out.append(self.anomaly(name, anomaly))
            if len(found) > ANOMALIES_SHOWN:
                out.append(f"<p>… and {len(found) - ANOMALIES_SHOWN} more of this kind.</p>")
        return "\n".join(out)

    def anomaly(self, checker: str, anomaly: dict[str, Any]) -> str:
        indexes = anomaly.get("op_indexes") or []
        indexes = indexes if isinstance(indexes, list) else [indexes]
        links = " ".join(_op_link(i, self.linked) for i in indexes[:OP_LINKS_SHOWN])
        if len(indexes) > OP_LINKS_SHOWN:
            links += f" … ({len(indexes)} ops in all)"
        out = [
            '<div class="anomaly">',
            f"<p>{_e(anomaly.get('message', ''))} <small>({_e(checker)})</small></p>",
            f"<p>ops: {links or '—'}</p>",
        ]
        rows = self.op_rows(indexes[:OP_ROWS_SHOWN])
        if rows:
            out.append(
                "<table><tr><th>op</th><th>type</th><th>f</th><th>process</th><th>node</th>"
                "<th>time (s)</th><th>value</th><th>error</th></tr>"
            )
            out += rows
            out.append("</table>")
        out.append("</div>")
        return "\n".join(out)

    def op_rows(self, indexes: Sequence[Any]) -> list[str]:
        """The ops named (highlighted), each with its invoke/completion pair, each op once."""
        named = {index for index in indexes if _op_anchor(index)}
        shown: set[Any] = set()
        rows = []
        for index in indexes:
            op = self.by_index.get(index) if index in named else None
            if op is None:
                rows.append(
                    f'<tr class="ref"><td>{_e(index)}</td>'
                    '<td colspan="7">not in the history</td></tr>'
                )
                continue
            pair = self.pair_of.get(index)
            for o in [op] if pair is None else sorted((op, pair), key=lambda o: o.get("index")):
                if o.get("index") not in shown:
                    shown.add(o.get("index"))
                    rows.append(self.op_row(o, o.get("index") in named))
        return rows

    def op_row(self, op: dict[str, Any], ref: bool) -> str:
        value = op.get("value")
        error = op.get("error")
        row_class = ' class="ref"' if ref else ""
        return (
            f"<tr{row_class}>"
            f"<td>{_op_link(op.get('index'), self.linked)}</td><td>{_e(op.get('type'))}</td>"
            f"<td>{_e(op.get('f'))}</td><td>{_e(op.get('process'))}</td>"
            f"<td>{_e(op.get('node') if op.get('node') is not None else '—')}</td>"
            f'<td class="num">{_seconds(op):.3f}</td>'
            f"<td><code>{_e(_trim(_json(value), VALUE_CHARS)) if value is not None else ''}</code></td>"
            f"<td><code>{_e(_trim(_json(error), VALUE_CHARS)) if error is not None else ''}</code></td>"
            "</tr>"
        )

    def figures(self) -> str:
        return (
            "<h2>Latency</h2>"
            f'<p><img src="{LATENCY_PNG}" alt="latency of each op over time, nemesis windows shaded"></p>'
            "<p>Each op at its invoke time; an info op at its timeout, or at the history's end if "
            "it never completed.</p>"
            "<h2>Throughput</h2>"
            f'<p><img src="{THROUGHPUT_PNG}" alt="completions per second by outcome, nemesis windows shaded"></p>'
        )

    def latency(self) -> str:
        out = [
            "<h2>Latency quantiles (ms, ok ops)</h2><table>",
            "<tr><th>f</th><th>ok</th><th>fail</th><th>info</th>"
            "<th>p50</th><th>p95</th><th>p99</th><th>max</th></tr>",
        ]
        for row in latency_table(self.ops):
            quantiles = (
                [f"{row.ok_ms[q]:.1f}" for q in ("p50", "p95", "p99", "max")]
                if row.ok_ms
                else ["—"] * 4
            )
            cells = [row.counts[o] for o in OUTCOMES] + quantiles
            out.append(
                f"<tr><td>{_e(row.f)}</td>"
                + "".join(f'<td class="num">{_e(c)}</td>' for c in cells)
                + "</tr>"
            )
        out.append("</table>")
        return "\n".join(out)

    def nemeses(self) -> str:
        if not self.spans:
            return "<h2>Nemesis timeline</h2><p>No nemesis events.</p>"
        out = [
            "<h2>Nemesis timeline</h2><table>",
            "<tr><th>start (s)</th><th>stop (s)</th><th>kind</th><th>details</th></tr>",
        ]
        for span in self.spans:
            details = []
            for label, op in (("start", span.start), ("stop", span.stop)):
                if op is None or (label == "stop" and op is span.start):
                    continue
                value = op.get("value")
                rest = (
                    {k: v for k, v in value.items() if k != "phase"}
                    if isinstance(value, dict)
                    else value
                )
                if rest:
                    details.append(f"{label}: {_trim(_json(rest), DETAILS_CHARS)}")
            start = f"{span.start_s:.3f}" if span.start is not None else "—"
            stop = f"{span.stop_s:.3f}" if span.stop is not None else "not stopped"
            out.append(
                f'<tr><td class="num">{start}</td><td class="num">{stop}</td>'
                f"<td>{_e(span.kind)}</td><td><code>{_e('; '.join(details))}</code></td></tr>"
            )
        out.append("</table>")
        return "\n".join(out)

    def op_section(self) -> str:
        shown = sorted(i for i in self.linked if i in self.by_index)
        out = ['<h2 id="ops">Ops</h2>']
        if not shown:
            out.append("<p>No ops are named by an anomaly.</p>")
        for index in shown:
            out.append(
                f'<div class="op" id="{_op_anchor(index)}"><h4>op {index}</h4>'
                f"<pre>{_e(_json(self.by_index[index], indent=2))}</pre></div>"
            )
        return "\n".join(out)


def render_html(
    title: str, history: Sequence[dict[str, Any]], results: dict[str, Any] | None
) -> str:
    return _Page(title, history, results).render()


# --- files ----------------------------------------------------------------------------------


def load_history(path: Path) -> list[dict[str, Any]]:
    history = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                op = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line: {error}") from error
            if not isinstance(op, dict):
                raise ValueError(
                    f"{path}:{number}: an op is a JSON object, not {type(op).__name__}"
                )
            history.append(op)
    return history


def load_results(path: Path) -> dict[str, Any] | None:
    """The checkers' verdicts, or None when the run has not been checked."""
    if not path.exists():
        return None
    results = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(results, dict):
        raise ValueError(f"{path}: results are a JSON object, not {type(results).__name__}")
    return results


def write_report(
    run_dir: Path,
    history: list[dict[str, Any]] | None = None,
    results: dict[str, Any] | None = None,
) -> Path:
    """Write run_dir/index.html and its PNGs; return the page's path.

    `history` defaults to run_dir/history.jsonl and `results` to run_dir/results.json (a run
    without it is reported as not checked).
    """
    run_dir = Path(run_dir)
    if history is None:
        history = load_history(run_dir / HISTORY_FILE)
    if results is None:
        results = load_results(run_dir / RESULTS_FILE)
    page = _Page(f"quorumbook jepsen run {run_dir.resolve().name}", history, results)
    plot_latency(run_dir / LATENCY_PNG, page.ops, page.spans, page.end_s)
    plot_throughput(run_dir / THROUGHPUT_PNG, page.ops, page.spans, page.end_s)
    index = run_dir / INDEX_FILE
    # A JSON string may hold a lone surrogate ("\ud800"), which UTF-8 cannot encode.
    index.write_text(page.render(), encoding="utf-8", errors="backslashreplace")
    return index


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jepsen.report",
        description="Write RUN_DIR/index.html and its PNGs from history.jsonl and results.json.",
        epilog="example: python -m jepsen.report store/20250101T120000-orders",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    args = parser.parse_args(argv)
    print(write_report(args.run_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
