"""The embedded Prefect server: `prefect server start`, with kiln's fix to the SQLite driver it runs on by default
(`kiln.store.sqlite_driver`: without it, the server stood still for 60 s at a time under load)."""

if __name__ == "__main__":
    from kiln.store.sqlite_driver import close_failed_cursors

    close_failed_cursors()
    from prefect.cli import app

    app()
