"""embedpipe's benchmark suite: every claim a ratio, measured side by side in one run.

Run ``python -m benchmarks`` from the repository root to run every scenario and rewrite
``BENCHMARKS.md``; ``python -m benchmarks --quick`` is the CI smoke test (small sizes,
timings not judged, report written to a temporary file). See ``python -m benchmarks --help``.

Each scenario is a module with ``NAME``, ``TITLE``, ``GOAL`` and ``run(ctx) -> Result``, and
optionally ``start(ctx)``, called before any scenario runs, to begin background work.
"""
