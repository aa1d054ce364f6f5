"""embedpipe.registry: one scheme table per kind of backend, plugins by register() or entry point."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from embedpipe import registry
from embedpipe._urls import URL
from embedpipe.cache import MemoryCache, cache_from_url
from embedpipe.deadletters import dead_letter_store_from
from embedpipe.errors import ConfigurationError
from embedpipe.jobs.sinks import JSONLSink, ParquetSink, sink_from
from embedpipe.jobs.sources import CSVSource, DirectorySource, JSONLSource, source_from
from embedpipe.jobs.state import JobState, job_store_from
from embedpipe.limits import rate_limiter_from

ROOT = Path(__file__).resolve().parent.parent

#: each kind's public builder, and the schemes it serves out of the box
BUILDERS: dict[str, tuple[registry.Registry, Callable[[str], Any], set[str]]] = {
    "cache": (registry.caches, cache_from_url, {"memory", "sqlite", "redis", "rediss", "unix"}),
    "rate limiter": (registry.rate_limiters, lambda url: rate_limiter_from(url, rpm=10),
                     {"memory", "redis", "rediss", "unix"}),
    "dead-letter store": (registry.dead_letter_stores, dead_letter_store_from, {"memory", "sqlite"}),
    "source": (registry.sources, source_from, {"jsonl", "csv", "parquet", "dir"}),
    "sink": (registry.sinks, sink_from, {"parquet", "jsonl"}),
    "job store": (registry.job_stores, job_store_from, {"sqlite"}),
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_each_registry_rejects_an_unknown_scheme_listing_the_known_ones(kind: str) -> None:
    table, build, builtin = BUILDERS[kind]
    assert builtin <= set(table.schemes())
    with pytest.raises(ConfigurationError) as info:
        build("nosuchdb://admin:hunter2@db.example:1234/x?opt=1")
    message = str(info.value)
    assert f"unknown {kind} URL scheme 'nosuchdb'" in message
    assert "nosuchdb://admin:***@db.example:1234/x" in message and "hunter2" not in message
    for scheme in builtin:
        assert f"{scheme}://" in message


@pytest.mark.parametrize("url,message", [
    ("memory://?colour=red", "colour"),
    ("sqlite:///c.db?max_entries=5", "max_entries"),
    ("redis://localhost/0?shards=3", "shards"),
])
def test_unknown_options_are_rejected_with_the_known_ones(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=f"unknown option.*{message}.*takes"):
        cache_from_url(url)


def test_unknown_options_of_other_kinds(tmp_path: Path) -> None:
    for build, url in [(lambda u: rate_limiter_from(u, rpm=1), "memory://?burst=2"),
                       (lambda u: rate_limiter_from(u, rpm=1), "redis://localhost/0?burst=2"),
                       (dead_letter_store_from, f"sqlite:///{tmp_path}/d.db?ttl=1d"),
                       (sink_from, f"jsonl:///{tmp_path}/o.jsonl?part_rows=3"),
                       (source_from, f"dir:///{tmp_path}?id_field=x"),
                       (job_store_from, f"sqlite:///{tmp_path}/s.sqlite?wal=off")]:
        with pytest.raises(ConfigurationError, match="unknown option"):
            build(url)


def test_file_schemes_of_every_kind_open_relative_and_absolute_paths(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.txt").write_text("id,text\n1,hello\n", encoding="utf-8")
    (tmp_path / "notes").mkdir()
    csv_source = source_from("csv:///rows.txt")  # the scheme names the format whatever the suffix
    assert isinstance(csv_source, CSVSource) and [r.text for r in csv_source] == ["hello"]
    assert isinstance(source_from(f"dir:///{tmp_path}/notes"), DirectorySource)
    fields = source_from("jsonl:///x.jsonl?id_field=uid&text_field=body")
    assert isinstance(fields, JSONLSource) and (fields.id_field, fields.text_field) == ("uid", "body")
    parquet = sink_from(f"parquet:///{tmp_path}/vec?part_rows=100")
    assert isinstance(parquet, ParquetSink) and parquet.path == tmp_path / "vec" and parquet.part_rows == 100
    jsonl = sink_from("jsonl:///rel/out.jsonl")
    assert isinstance(jsonl, JSONLSink) and jsonl.path == Path("rel/out.jsonl")
    state = job_store_from("sqlite:///rel/_state.sqlite?timeout=5")
    assert isinstance(state, JobState) and state.path == Path("rel/_state.sqlite") and state.timeout == 5
    state.close()
    # Plain paths keep working, as before.
    assert isinstance(sink_from(tmp_path / "v.jsonl"), JSONLSink) and isinstance(sink_from("vec2"), ParquetSink)
    with job_store_from(tmp_path / "plain.sqlite") as plain:
        assert plain.path == tmp_path / "plain.sqlite"
    with pytest.raises(ConfigurationError, match="contradicts"):
        source_from("csv:///rows.txt", format="jsonl")


def test_a_plugin_registers_a_scheme_and_can_serve_several_kinds() -> None:
    seen: list[URL] = []

    def factory(url: URL) -> MemoryCache:
        seen.append(url)
        url.check_options(("size",))
        return MemoryCache(max_entries=int(url.options["size"]))

    registry.caches.register("mycache://", factory)
    try:
        cache = cache_from_url("mycache://node-1:7000/?size=3")
        assert isinstance(cache, MemoryCache) and cache.max_entries == 3
        assert seen[0].host == "node-1" and seen[0].port == 7000
        assert "mycache" in registry.caches.schemes()
    finally:
        registry.caches.unregister("mycache")
    with pytest.raises(ConfigurationError, match="unknown cache URL scheme 'mycache'"):
        cache_from_url("mycache://node-1")
    # A factory that builds the wrong kind of object is caught, naming the URL.
    registry.caches.register("wrong", lambda url: object())
    try:
        with pytest.raises(ConfigurationError, match="not a CacheBackend"):
            cache_from_url("wrong://x")
    finally:
        registry.caches.unregister("wrong")


def test_entry_points_are_found_lazily_and_cannot_hijack_builtin_schemes(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # A real installed distribution, as pip would leave it: a package and its .dist-info with entry points.
    pkg = tmp_path / "ep_plugin_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        IMPORTED = True

        def make(url, **options):
            return ("plugin", url.host, options)

        def evil(url, **options):
            raise AssertionError("a plugin must not replace a built-in scheme")
    """), encoding="utf-8")
    info = tmp_path / "ep_plugin_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin-pkg\nVersion: 1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(
        "[embedpipe.test_kind]\nplugdb = ep_plugin_pkg:make\nmemory = ep_plugin_pkg:evil\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    table = registry.Registry("test thing", "embedpipe.test_kind", {"memory": lambda url, **kw: "builtin"})
    assert table.from_url("memory://") == "builtin"  # found in the table: entry points not even read
    assert "ep_plugin_pkg" not in sys.modules
    assert table.schemes() == ["memory", "plugdb"]
    assert "ep_plugin_pkg" not in sys.modules  # listed, not imported
    assert table.from_url("plugdb://host-a/x", flag=1) == ("plugin", "host-a", {"flag": 1})
    assert table.from_url("memory://") == "builtin"
    monkeypatch.delitem(sys.modules, "ep_plugin_pkg")


def test_a_missing_optional_dependency_is_named_with_its_extra() -> None:
    table = registry.Registry("cache", "embedpipe.none", {"x": "embedpipe_no_such_module.sub:Thing.from_url"})
    with pytest.raises(ConfigurationError, match="x:// could not be imported"):
        table.from_url("x://")
    table = registry.Registry("cache", "embedpipe.none", {"x": "embedpipe.cache:NoSuchClass"})
    with pytest.raises(ConfigurationError, match="no attribute 'NoSuchClass'"):
        table.from_url("x://")


def test_backends_are_imported_only_when_their_scheme_is_used() -> None:
    code = ("import sys, embedpipe, embedpipe.jobs; from embedpipe.cache import cache_from_url; "
            "cache_from_url('memory://'); "
            "print(sorted(m for m in ('redis', 'embedpipe.cache.redis') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
