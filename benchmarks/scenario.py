"""What a scenario is given (:class:`Context`) and what it returns (:class:`Result`)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["ok", "not available", "error"]


class Unavailable(Exception):
    """A scenario, or one competitor in it, cannot run here (a package or the jobs CLI is missing)."""


@dataclass
class Table:
    """One markdown table: a title, column names and rows of already formatted cells."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


@dataclass
class Plot:
    """A PNG written under the plots folder, with the caption the report shows."""

    caption: str
    path: Path


@dataclass
class Result:
    """The outcome of one scenario: its headline, tables, plots, notes and whether its goal was met.

    ``goal_met`` is ``None`` when the goal could not be judged (a competitor or the
    jobs CLI missing). ``data`` keeps the raw numbers for ``results.json``.
    """

    name: str
    title: str
    goal: str
    goal_met: bool | None = None
    headline: str = ""
    tables: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    setup: str = ""
    status: Status = "ok"
    reason: str = ""
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What every scenario shares: the mode, the repository, where plots and scratch files go."""

    quick: bool
    repo: Path
    plots_dir: Path
    scratch: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="embedpipe-bench-")))
    #: what scenarios' ``start(ctx)`` hooks began before any scenario ran (background work), by name
    started: dict[str, Any] = field(default_factory=dict)

    def plot_path(self, name: str) -> Path:
        """The PNG file for plot ``name`` (the folder is created on demand)."""
        self.plots_dir.mkdir(parents=True, exist_ok=True)
        return self.plots_dir / f"{name}.png"

    def save_plot(self, name: str, caption: str, draw: Callable[[Any, Any], None],
                  size: tuple[float, float] = (7, 3.5)) -> Plot | None:
        """Draw with ``draw(fig, ax)`` and save ``plots/<name>.png``; ``None`` when matplotlib is missing."""
        try:
            import matplotlib

            matplotlib.use("Agg")  # files only, no display
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        fig, ax = plt.subplots(figsize=size)
        try:
            draw(fig, ax)
            fig.tight_layout()
            path = self.plot_path(name)
            fig.savefig(path, dpi=110)
        finally:
            plt.close(fig)
        return Plot(caption, path)

    def scratch_dir(self, name: str) -> Path:
        """A fresh scratch folder for one scenario's databases and files."""
        path = self.scratch / name
        path.mkdir(parents=True, exist_ok=True)
        return path
