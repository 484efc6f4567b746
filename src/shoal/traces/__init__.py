"""Traces: one record per model call, in SQLite."""
