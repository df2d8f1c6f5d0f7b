"""Prefect Block types for registered infrastructure."""
