"""The Prefect settings every kiln process shares; set before Prefect is first imported."""

from __future__ import annotations

import os

from pydantic import SecretStr

from kiln.settings import KilnSettings

# the LocalFileSystem block job outputs are written to; `kiln deploy` creates it under KILN_HOME
RESULTS_BLOCK = "kiln-results"


def prefect_env(settings: KilnSettings) -> dict[str, str]:
    home = settings.home_dir
    return {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_API_URL": settings.prefect_api,
        "PREFECT_UI_URL": settings.prefect_api.removesuffix("/api"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": settings.prefect_db_url,
        # job outputs: kiln's relay reads them back from here
        "PREFECT_LOCAL_STORAGE_PATH": str(settings.results_dir),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        # a named block is read once per process; without one Prefect asks the server for its
        # default storage at every flow run (about 40 ms each, measured in bench/latency.py)
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": f"local-file-system/{RESULTS_BLOCK}",
        # the kiln worker wakes on events; this poll is only the fallback
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_PREFETCH_SECONDS": "0",
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
        # A run's own lines (get_run_logger() in flows and tasks) go to the Prefect API at INFO, so
        # every run page shows them; the console keeps to warnings, or every job would print its
        # steps into the worker's terminal. The API handler sends in batches from a thread of its own.
        "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL": "INFO",
        "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "INFO",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
        "PREFECT_LOGGING_TO_API_ENABLED": "true",
        "KILN_HOME": str(home),
    }


def kiln_env(settings: KilnSettings) -> dict[str, str]:
    """The settings as KILN_* variables, so the processes a launcher starts share them (secrets as they are)."""
    return {f"KILN_{k.upper()}": str(v.get_secret_value() if isinstance(v, SecretStr) else v)
            for k, v in settings.model_dump(exclude_none=True).items()}  # fmt: skip


def configure_prefect(settings: KilnSettings) -> None:
    """Points this process's Prefect client at kiln's server; must run before `import prefect`."""
    import sys

    if "prefect" in sys.modules:
        raise RuntimeError("configure_prefect() must run before prefect is imported")
    os.environ.update(prefect_env(settings))
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    settings.results_dir.mkdir(parents=True, exist_ok=True)
