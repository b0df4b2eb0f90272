"""`make jepsen`: a matrix of runs, every nemesis on 3 and 5 nodes, plus the planted bug, each
with its report; a table of verdicts at the end (and OUT/matrix.json).

    python -m jepsen.matrix [--time 60] [--rate 150] [--out store] [--seed 1]

Exit 0 when every healthy run is valid and the planted-bug run is not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .run import Options, run

NEMESES = ("kill", "pause", "partition", "restart-all", "clock", "membership", "data",
           "kill,pause,partition")  # fmt: skip
# (nodes, nemeses, planted bug): the planted bug must be found, the rest must be valid.
MATRIX = [(n, nem, False) for n in (3, 5) for nem in NEMESES] + [(3, "partition", True)]


def _row(nodes: int, nemeses: str, planted: bool, results: dict, wall_s: float) -> dict:
    checkers = results.get("checkers", {})
    stats = checkers.get("sequencer", {}).get("stats", {})
    anomalies = sorted({a["kind"] for c in checkers.values() for a in c.get("anomalies", [])})
    expected = not planted  # the planted bug must make the run invalid
    return {
        "nodes": nodes,
        "nemeses": nemeses + (" +unsafe-local-reads" if planted else ""),
        "valid": results.get("valid"),
        "as_expected": results.get("valid") is expected,
        "ok": stats.get("ok"),
        "fail": stats.get("fail"),
        "info": stats.get("info"),
        "reads": checkers.get("reads", {}).get("stats", {}).get("reads"),
        "faults": results.get("run", {}).get("faults"),
        "anomalies": anomalies,
        "wall_s": round(wall_s, 1),
        "dir": results.get("dir"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jepsen.matrix")
    ap.add_argument("--time", type=float, default=60.0, help="seconds of faults per run")
    ap.add_argument("--rate", type=float, default=150.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("store"))
    args = ap.parse_args(argv)
    rows = []
    for i, (nodes, nemeses, planted) in enumerate(MATRIX):
        print(f"[{i + 1}/{len(MATRIX)}] {nodes} nodes, {nemeses}"
              + (" (planted bug)" if planted else ""), flush=True)  # fmt: skip
        opts = Options(nodes=nodes, time_s=args.time, rate=args.rate, seed=args.seed + i,
                       nemeses=tuple(nemeses.split(",")), out=args.out,
                       unsafe_local_reads=planted)  # fmt: skip
        started = time.monotonic()
        try:
            results = run(opts, progress=lambda line: print(line, flush=True))
        except Exception as exc:  # the matrix goes on; the row says the run broke
            results = {"valid": "error", "error": f"{type(exc).__name__}: {exc}"}
        rows.append(_row(nodes, nemeses, planted, results, time.monotonic() - started))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "matrix.json").write_text(json.dumps(rows, indent=2) + "\n")
    print()
    print(f"{'nodes':>5}  {'nemeses':34} {'valid':>7} {'expected':>8} {'ok':>6} {'fail':>5} "
          f"{'info':>5} {'reads':>6} {'faults':>6}  anomalies")  # fmt: skip
    for r in rows:
        print(f"{r['nodes']:>5}  {r['nemeses']:34} {r['valid']!s:>7} "
              f"{'yes' if r['as_expected'] else 'NO':>8} {r['ok'] or 0:>6} {r['fail'] or 0:>5} "
              f"{r['info'] or 0:>5} {r['reads'] or 0:>6} {r['faults'] or 0:>6}  "
              f"{', '.join(r['anomalies']) or '-'}")  # fmt: skip
    print(f"\nreports: {args.out}/*/index.html; table: {args.out / 'matrix.json'}")
    return 0 if all(r["as_expected"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
