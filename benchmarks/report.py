"""BENCHMARKS.md: the machine, the versions, a summary of goals, then each scenario's tables, plots and notes."""

# The report writes ratios with the multiplication sign, as the issue states them.
# ruff: noqa: RUF001, RUF002

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.scenario import Result, Table

#: distributions whose versions the report records
DISTRIBUTIONS = ("embedpipe", "numpy", "openai", "tiktoken", "langchain-core", "langchain-openai",
                 "langchain-classic", "langchain-community", "llama-index-core", "llama-index-embeddings-openai",
                 "sentence-transformers", "torch", "transformers", "redis", "matplotlib", "psutil")


# -- formatting, shared by the scenarios ------------------------------------------------------
def seconds(value: float) -> str:
    """``1.23 s``, ``12.3 ms`` or ``45 µs``."""
    if value != value:  # NaN
        return "n/a"
    if value < 0:
        return "-" + seconds(-value)
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e6:.0f} µs"


def ratio(value: float) -> str:
    """``1.07×``."""
    return "n/a" if value != value else f"{value:.2f}×"


def percent(value: float, digits: int = 1) -> str:
    """``95.3%``."""
    return "n/a" if value != value else f"{value * 100:.{digits}f}%"


def size(n: float) -> str:
    """``31.7 KB`` (decimal units, as the issue states sizes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


# -- the machine ------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """Cores, RAM, CPU model, GPU, OS and Python of this machine."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "usable cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": _cpu_model(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    try:
        import psutil

        info["ram"] = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:
        info["ram"] = "unknown (psutil not installed)"
    info["gpu"] = gpu_name() or "no GPU"
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_name() -> str | None:
    """The CUDA device torch sees, or ``None``."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_name(0))


def versions() -> dict[str, str]:
    """Installed versions of the libraries compared, and of the Redis server."""
    out = {}
    for name in DISTRIBUTIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    try:
        import redis

        out["redis server"] = str(redis.Redis(socket_connect_timeout=1).info("server")["redis_version"])
    except Exception as exc:
        out["redis server"] = f"unreachable ({type(exc).__name__})"
    return out


def git_state(repo: Path) -> str:
    """``abc1234`` plus a warning when the benchmarked code differs from that commit."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "embedpipe", "langchain_embedpipe", "llamaindex_embedpipe",
                "benchmarks", "tests/openai_server.py", ":(exclude)benchmarks/plots")  # plots are output
    if dirty:
        return f"{commit} (with uncommitted changes to {len(dirty.splitlines())} file(s) of the benchmarked code)"
    return commit


# -- markdown -----------------------------------------------------------------------------------
def table(t: Table) -> str:
    """A markdown table with its title."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = [f"**{t.title}**", "", "| " + " | ".join(cell(c) for c in t.columns) + " |",
             "|" + "|".join("---" for _ in t.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in t.rows]
    if t.note:
        lines += ["", t.note]
    return "\n".join(lines)


def verdict(r: Result, quick: bool) -> str:
    """What the summary says about one scenario's goal."""
    if r.status == "not available":
        return f"not available: {r.reason}"
    if r.status == "error":
        return f"error: {r.reason}"
    if quick:
        return "not judged (quick mode)"
    if r.goal_met is None:
        return "not judged"
    return "met" if r.goal_met else "**missed**"


def render(results: list[Result], *, quick: bool, started: dt.datetime, elapsed: float, repo: Path,
           output: Path, command: str) -> str:
    """The whole report."""
    mach, vers = machine(), versions()
    out = [
        "# embedpipe benchmarks",
        "",
        f"Generated by `{command}` on {started:%Y-%m-%d %H:%M} UTC in {elapsed / 60:.1f} min, from commit "
        f"{git_state(repo)}. Do not edit by hand: run the command again.",
        "",
        "Reproduce: `pip install -e '.[dev,bench]'`, Redis on 127.0.0.1:6379, then `python -m benchmarks` from "
        "the repository root (`--quick` for the CI smoke run, `--only cached,cost` for some scenarios). The "
        "plots are in `benchmarks/plots/`, the raw numbers in `benchmarks/out/results.json`.",
        "",
    ]
    if quick:
        out += ["> **Quick mode**: small sizes, a smoke test that every scenario still executes. "
                "The figures below are not judged and say nothing about performance.", ""]
    out += [
        "Every claim is a ratio between tools measured side by side in the same run, interleaved round "
        "after round where times are compared. The machine is shared and noisy (two cores; other "
        "engineers' test suites may run at the same time), so absolute times move between runs while "
        "the ratios hold much better. The corpus is the real Python 3.11 documentation "
        "(`../shared/data/pydocs-sections.jsonl.gz`: 4,362 sections, 2.6M cl100k tokens); only the "
        "jobs-CLI memory scenario uses synthetic records. The OpenAI-compatible test server "
        "(`tests/openai_server.py`) runs in its own process and bills what OpenAI would bill.",
        "",
        "## Summary",
        "",
        "| # | Scenario | Goal | Measured | Verdict |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(results, 1):
        out.append(f"| {i} | [{r.title}](#{_anchor(i, r.title)}) | {r.goal} | {r.headline or '—'} | "
                   f"{verdict(r, quick)} |")
    out += ["", "## Machine and versions", ""]
    out += [f"- **{k}**: {v}" for k, v in mach.items()]
    out += ["- **versions**: " + ", ".join(f"{k} {v}" for k, v in vers.items())]
    for i, r in enumerate(results, 1):
        out += ["", f"## {i}. {r.title}", "", f"**Goal:** {r.goal}  ", f"**Verdict:** {verdict(r, quick)}"
                + (f" ({r.seconds:.0f} s)" if r.seconds else ""), ""]
        if r.setup:
            out += [r.setup, ""]
        for t in r.tables:
            out += [table(t), ""]
        for p in r.plots:
            rel = os.path.relpath(p.path, output.parent)
            out += [f"![{p.caption}]({rel})", "", f"*{p.caption}*", ""]
        if r.notes:
            out += ["Notes:", ""] + [f"- {n}" for n in r.notes] + [""]
    return "\n".join(out).rstrip() + "\n"


def _anchor(i: int, title: str) -> str:
    text = f"{i}. {title}".lower()
    return "".join(c for c in text.replace(" ", "-") if c.isalnum() or c in "-_")
