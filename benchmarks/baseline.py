"""``--baseline DIR``: the same calls timed on an old checkout and on this one, in alternating rounds.

Each round runs :mod:`benchmarks.baseline_probe` twice in fresh subprocesses, once with
``PYTHONPATH=DIR`` and once with this repository, swapping which goes first every round,
so drift on a noisy machine hits both sides alike. A metric's ratio is old seconds ÷ new
seconds (above 1: this checkout is faster); "no slower" means the best-round ratio
(best old round ÷ best new round) is at least 0.97.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.scenario import Result, Table

NAME = "baseline"
TITLE = "This checkout against a baseline checkout, same calls, alternating rounds"
GOAL = "no slower: best-round ratio (old ÷ new) ≥ 0.97 for every metric"
PROBE = Path(__file__).with_name("baseline_probe.py")
NO_SLOWER = 0.97


def _probe(tree: Path, scenarios: list[str], quick: bool) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(PROBE), "--scenarios", ",".join(scenarios)] + (["--quick"] if quick else [])
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the probe failed in {tree}: {done.stderr[-2000:]}")
    data: dict[str, Any] = json.loads(done.stdout)
    where = Path(data.pop("_embedpipe")).parent
    if where.resolve() != tree.resolve():
        raise RuntimeError(f"the probe for {tree} imported embedpipe from {where}")
    return data


def compare(baseline: Path, repo: Path, scenarios: list[str], *, quick: bool, rounds: int) -> Result:
    """Run the alternating rounds and report every metric's ratios."""
    if not (baseline / "embedpipe" / "__init__.py").exists():
        raise SystemExit(f"--baseline {baseline}: no embedpipe package there (pass a checkout's root folder)")
    old: dict[str, list[float]] = {}
    new: dict[str, list[float]] = {}
    for r in range(rounds):
        order = [(baseline, old), (repo, new)] if r % 2 == 0 else [(repo, new), (baseline, old)]
        for tree, into in order:
            print(f"[benchmarks] baseline round {r + 1}/{rounds}: {tree}", file=sys.stderr, flush=True)
            for metric, seconds in _probe(tree, scenarios, quick).items():
                into.setdefault(metric, []).append(float(seconds))
    rows = []
    met = True
    data: dict[str, Any] = {}
    for metric in sorted(set(old) & set(new)):
        best_ratio = min(old[metric]) / min(new[metric])
        per_round = sorted(o / n for o, n in zip(old[metric], new[metric], strict=False))
        median = per_round[len(per_round) // 2]
        ok = best_ratio >= NO_SLOWER
        met = met and ok
        data[metric] = {"old": old[metric], "new": new[metric], "best_ratio": best_ratio, "median_ratio": median}
        rows.append([metric, report.seconds(min(old[metric])), report.seconds(min(new[metric])),
                     f"{best_ratio:.3f}", f"{median:.3f}", "yes" if ok else "**no**"])
    worst = min((d["best_ratio"] for d in data.values()), default=float("nan"))
    return Result(NAME, TITLE, GOAL, goal_met=met if data else None,
                  headline=f"worst best-round ratio {worst:.3f} over {len(data)} metrics",
                  setup=f"baseline `{baseline}`, this checkout `{repo}`; {rounds} rounds, each running "
                        "`benchmarks/baseline_probe.py` in a fresh subprocess per side, the order swapped every "
                        "round; the fake:1536 model, so only embedpipe's own code is timed",
                  tables=[Table("Seconds, best round per side; ratio old ÷ new (above 1: this checkout faster)",
                                ["metric", "baseline", "this checkout", "best-round ratio", "median round ratio",
                                 "no slower"], rows)],
                  data=data)
