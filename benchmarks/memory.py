"""Memory: peak RSS of ``embedpipe run`` (the jobs CLI) over 100k and 1M synthetic records.

Each run is a child process (``python -m embedpipe.cli run SOURCE --model fake:64 --out OUT``)
with a fresh SQLite cache and output folder. Its peak RSS is the kernel's high-water mark of
its address space (``VmHWM`` in ``/proc/PID/status``), read every 0.1 s, plus that of any
process it starts. Not ``ru_maxrss``: Linux carries the parent's high-water mark into a
child across fork and exec, so a child of a large runner would report the runner's size.
Synthetic records are used because the scenario needs a million of them.
"""

# The report writes ratios with the multiplication sign, as the issue states them.
# ruff: noqa: RUF001, RUF003

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.corpus import write_synthetic_records
from benchmarks.scenario import Context, Plot, Result, Table, Unavailable

NAME = "memory"
TITLE = "Memory of a jobs-CLI run"
GOAL = "peak RSS of `embedpipe run` flat from 100k to 1M records, ≤ 1 GB"

LIMIT = 1_000_000_000
FLAT = 1.25  # "flat": 10× the records may cost at most 25% more peak memory


def _high_water(pid: int) -> int:
    """Peak RSS in bytes of process ``pid``'s current address space (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class CliRun:
    """One ``embedpipe run`` child, its RSS sampled from another thread until it exits."""

    def __init__(self, n: int, scratch: Path, repo: Path, *, nice: bool = False) -> None:
        import psutil

        self.n = n
        self.nice = nice
        self.source = write_synthetic_records(scratch / f"records-{n}.jsonl", n)
        args = [str(self.source), "--model", "fake:64", "--out", str(scratch / f"out-{n}"),
                "--cache", f"sqlite:///{scratch / f'cache-{n}.db'}", "--no-progress"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
        self.log = scratch / f"run-{n}.log"
        self._err = self.log.open("w")
        prefix = ["nice", "-n", "19"] if nice else []
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "embedpipe.cli", "run", *args],
                                     stdout=self._err, stderr=self._err, env=env)
        self.start = time.monotonic()
        self.samples: list[tuple[float, int]] = []
        self.peaks: dict[int, int] = {}
        self.end = self.start
        self._stop = threading.Event()
        self._psutil = psutil
        self._result: dict[str, Any] | None = None
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        psutil = self._psutil
        try:
            ps = psutil.Process(self.proc.pid)
            while not self._stop.is_set() and self.proc.poll() is None:
                family = [ps, *ps.children(recursive=True)]
                for p in family:
                    self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), _high_water(p.pid))
                self.samples.append((time.monotonic() - self.start, sum(p.memory_info().rss for p in family)))
                self._stop.wait(0.1)
        except psutil.Error:
            pass
        finally:
            self.proc.wait()
            self.end = time.monotonic()

    def wait(self) -> dict[str, Any]:
        """Wait for the run to end; its peak RSS, time, exit code, RSS samples and the end of its log."""
        if self._result is None:
            self._sampler.join()
            code = self.proc.returncode
            seconds = self.end - self.start
            self._err.close()
            self.source.unlink(missing_ok=True)
            self._result = {"peak": sum(self.peaks.values()), "seconds": seconds, "code": code,
                            "samples": self.samples, "nice": self.nice, "log_tail": self.log.read_text()[-500:]}
        return self._result

    def stop(self) -> None:
        """Kill the run if it is still going (the suite is ending)."""
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()


def _check() -> None:
    if importlib.util.find_spec("embedpipe.cli") is None:
        raise Unavailable("the jobs CLI (embedpipe.cli) does not exist yet")
    try:
        import click  # noqa: F401
        import psutil  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"{exc}: the CLI needs embedpipe[cli], the measurement psutil") from exc


def sizes(ctx: Context) -> tuple[int, int]:
    """The two input sizes compared."""
    return (1_000, 5_000) if ctx.quick else (100_000, 1_000_000)


def start(ctx: Context) -> CliRun | None:
    """Full mode: begin the 1M-record run now, at the lowest CPU priority, to overlap the other scenarios.

    It needs about ten minutes of CPU on this machine; run alone after the others, it would push the
    suite well past its 15-minute budget. Peak RSS does not depend on how much CPU a run gets.
    """
    if ctx.quick:
        return None
    _check()
    return CliRun(sizes(ctx)[1], ctx.scratch_dir(NAME), ctx.repo, nice=True)


def run(ctx: Context) -> Result:
    _check()
    small_n, large_n = sizes(ctx)
    scratch = ctx.scratch_dir(NAME)
    background = ctx.started.get(NAME)
    rows, runs = [], {}
    for n in (small_n, large_n):
        cli = background if n == large_n and background is not None else CliRun(n, scratch, ctx.repo)
        r = cli.wait()
        runs[n] = r
        if r["code"] != 0:
            raise RuntimeError(f"embedpipe run over {n:,} records exited with {r['code']}: {r['log_tail']}")
        when = "in the background, niced, beside the other scenarios" if r["nice"] else "alone"
        rows.append([f"{n:,}", report.size(r["peak"]), report.seconds(r["seconds"]), f"{n / r['seconds']:,.0f}",
                     when])
    small, large = runs[small_n]["peak"], runs[large_n]["peak"]
    growth = large / small
    met = large <= LIMIT and growth <= FLAT
    notes = ["Records are synthetic JSONL lines {id, text} of 20-60 words; the model is `fake:64` (no network), "
             "the cache a fresh SQLite file per run, the output a Parquet folder; every other option is the "
             "CLI's default (it reads the source once to estimate, then runs).",
             f"Peak RSS grows {growth:.2f}× for {large_n // small_n}× the records.",
             "In the full run the larger run starts with the suite at the lowest CPU priority (nice 19) and "
             "overlaps the other scenarios: its time is not comparable to the smaller run's, its memory is. "
             "Peak RSS is the kernel's high-water mark of the CLI process (VmHWM)."]
    if not met and not ctx.quick:
        notes.append("**Memory is not flat or exceeds 1 GB**: the run holds something per record; profile "
                     "`embedpipe/jobs/runner.py` with tracemalloc.")
    result = Result(NAME, TITLE, GOAL, goal_met=met,
                    headline=f"peak {report.size(large)} at {large_n:,} records, "
                             f"{growth:.2f}× the {small_n:,}-record run",
                    tables=[Table("Peak RSS of `embedpipe run`", ["records", "peak RSS", "time", "records/s", "run"],
                                  rows)],
                    notes=notes, data={str(n): {k: v for k, v in r.items() if k != "samples"} for n, r in runs.items()})
    plot = _plot(ctx, runs)
    if plot is not None:
        result.plots.append(plot)
    return result


def _plot(ctx: Context, runs: dict[int, dict[str, Any]]) -> Plot | None:
    def draw(fig: Any, ax: Any) -> None:
        for n, r in runs.items():
            if r["samples"]:
                ts, rss = zip(*r["samples"], strict=True)
                ax.plot([t / r["seconds"] * 100 for t in ts], [m / 1e6 for m in rss], label=f"{n:,} records")
        ax.set_xlabel("progress of the run (% of its time)")
        ax.set_ylabel("RSS (MB)")
        ax.set_ylim(bottom=0)
        ax.legend()
        ax.grid(alpha=0.3)

    return ctx.save_plot("memory", "RSS of `embedpipe run` over its run, by input size", draw)
