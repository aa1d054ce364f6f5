"""Database sources: SQL tables read through a streaming cursor (:mod:`embedpipe.sources.sql`)."""

from __future__ import annotations

from embedpipe.sources.sql import MySQLSource, PostgresSource, SQLiteSource, SQLSource

__all__ = ["MySQLSource", "PostgresSource", "SQLSource", "SQLiteSource"]
