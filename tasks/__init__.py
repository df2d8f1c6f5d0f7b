"""Executor tasks, grouped by domain."""
