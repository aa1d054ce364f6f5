"""``python -m benchmarks``: run every scenario and rewrite BENCHMARKS.md.

``--quick`` is CI's smoke test: small sizes, seconds per scenario, timings not judged,
and the report goes to a temporary file unless ``--output`` names one. ``--only`` picks
scenarios by name. A scenario that cannot run here (a package or the jobs CLI missing)
is reported as "not available", and one that fails is reported with its error; neither
stops the others. The exit status is 1 when a scenario failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks import report
from benchmarks.scenario import Context, Result, Unavailable

#: scenario name -> module, in the order they run and appear in the report
SCENARIOS = {
    "ratelimit": "benchmarks.ratelimit",
    "cached": "benchmarks.cached",
    "cost": "benchmarks.cost",
    "local": "benchmarks.local",
    "estimate": "benchmarks.estimate",
    "memory": "benchmarks.memory",
    "overhead": "benchmarks.overhead",
    "compact": "benchmarks.compact",
    "serve": "benchmarks.serve",
    "ingest": "benchmarks.ingest",
    "distributed": "benchmarks.distributed",
    "dupspend": "benchmarks.dupspend",
    "crashbill": "benchmarks.crashbill",
    "multimodal": "benchmarks.multimodal",
    "batch_api": "benchmarks.batch_api",
    "dbsinks": "benchmarks.dbsinks",
    "editstable": "benchmarks.editstable",
    "latechunk": "benchmarks.latechunk",
    "modelselect": "benchmarks.modelselect",
}

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes; a smoke test that does not judge timings")
    parser.add_argument("--only", default="", help=f"comma-separated scenarios: {', '.join(SCENARIOS)}")
    parser.add_argument("--output", type=Path, default=None,
                        help="report file (default: BENCHMARKS.md, or a temporary file with --quick)")
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                        help="time the --only scenarios' embedpipe calls on the checkout in DIR and on this one, in "
                             "alternating subprocess rounds, instead of running the scenarios")
    parser.add_argument("--rounds", type=int, default=None, help="rounds for --baseline (default 7, 2 with --quick)")
    args = parser.parse_args(argv)
    asked = [n.strip() for n in args.only.split(",") if n.strip()] or list(SCENARIOS)
    unknown = [n for n in asked if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    args.names = [n for n in SCENARIOS if n in asked]
    return args


def run_one(name: str, ctx: Context) -> Result:
    """Run one scenario; a missing dependency or a failure becomes a Result, never an exception."""
    start = time.perf_counter()
    try:
        module = importlib.import_module(SCENARIOS[name])
    except Unavailable as exc:
        return Result(name, name, "", status="not available", reason=str(exc))
    except ImportError as exc:
        return Result(name, name, "", status="not available", reason=f"{type(exc).__name__}: {exc}")
    try:
        result: Result = module.run(ctx)
    except Unavailable as exc:
        result = Result(name, module.TITLE, module.GOAL, status="not available", reason=str(exc))
    except Exception as exc:  # one failing scenario must not stop the others
        traceback.print_exc()
        result = Result(name, module.TITLE, module.GOAL, status="error", reason=f"{type(exc).__name__}: {exc}")
    result.seconds = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.output is not None:
        output = args.output.resolve()
    elif args.quick or args.baseline is not None:
        # A smoke run or a baseline comparison never rewrites the committed report by default.
        output = Path(tempfile.mkdtemp(prefix="embedpipe-bench-quick-")) / "BENCHMARKS.md"
    else:
        output = REPO / "BENCHMARKS.md"
    # The committed report links the committed plots; any other report keeps its plots beside it.
    plots = REPO / "benchmarks" / "plots" if output == REPO / "BENCHMARKS.md" else output.parent / "plots"
    ctx = Context(quick=args.quick, repo=REPO, plots_dir=plots)
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    results = []
    if args.baseline is not None:
        from benchmarks.baseline import compare

        rounds = args.rounds or (2 if args.quick else 7)
        results.append(compare(args.baseline.resolve(), REPO, args.names, quick=args.quick, rounds=rounds))
    scenario_names = [] if args.baseline is not None else args.names
    try:
        # A scenario may begin background work before any scenario runs (`start(ctx)`); run() collects it.
        for name in scenario_names:
            try:
                module = importlib.import_module(SCENARIOS[name])
                if hasattr(module, "start"):
                    ctx.started[name] = module.start(ctx)
            except Exception as exc:  # run() meets the same problem and reports it
                print(f"[benchmarks] {name}: could not start early ({exc})", file=sys.stderr)
        for name in scenario_names:
            print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
            result = run_one(name, ctx)
            results.append(result)
            state = result.status if result.status != "ok" else (result.headline or "ok")
            print(f"[benchmarks] {name}: {state} ({result.seconds:.1f} s)"
                  + (f" — {result.reason}" if result.reason else ""), file=sys.stderr, flush=True)
    finally:
        for handle in ctx.started.values():
            stop = getattr(handle, "stop", None)
            if stop is not None:
                stop()
        shutil.rmtree(ctx.scratch, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    command = "python -m benchmarks" + (" --quick" if args.quick else "") + \
        (f" --only {','.join(args.names)}" if args.names != list(SCENARIOS) else "") + \
        (f" --baseline {args.baseline}" if args.baseline is not None else "")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report.render(results, quick=args.quick, started=started, elapsed=elapsed, repo=REPO,
                                    output=output, command=command), encoding="utf-8")
    raw = output.with_name("results.json") if output != REPO / "BENCHMARKS.md" else \
        REPO / "benchmarks" / "out" / "results.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1, default=str), encoding="utf-8")
    print(f"[benchmarks] wrote {output} (raw numbers: {raw}) in {elapsed:.0f} s", file=sys.stderr)
    return 1 if any(r.status == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
