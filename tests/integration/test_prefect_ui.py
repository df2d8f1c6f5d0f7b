"""An `ml_predict` job's flow run as the Prefect UI shows it: its task runs and its logs, in headless Chromium."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest

from tests.integration.support import SETTINGS, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def rock_salt(a: float) -> dict:
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]).as_dict()


def prefect_post(path: str, body: dict) -> list[dict]:
    response = httpx.post(f"{SETTINGS.prefect_api}{path}", json=body, timeout=10)
    response.raise_for_status()
    return response.json()


def chromium(*arguments: str) -> str:
    # root in a container has no user namespace for Chromium's sandbox; the page is our own UI
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", "--window-size=1600,1300", "--virtual-time-budget=20000", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.fixture(scope="module")
def predicted(client):
    # three structures in batches of two: two predict batches, so the graph shows more than one step
    job = client.jobs.create(type="ml_predict", input={
        "structures": [rock_salt(5.5), rock_salt(5.6), rock_salt(5.7)], "property": "energy", "batch_size": 2,
    })
    job.wait(timeout=180)
    assert job.status.value == "completed", job.status_reason
    return job


def test_the_run_has_its_steps_as_task_runs(predicted):
    task_runs = prefect_post("/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [predicted.flow_run_id]}}})
    names = {run["name"]: run["state"]["type"] for run in task_runs}
    assert names == {
        "read structures": "COMPLETED",
        "load model tensornet-matpes-pbe": "COMPLETED",
        "predict batch 1 of 2": "COMPLETED",
        "predict batch 2 of 2": "COMPLETED",
    }


def test_the_run_has_its_logs_in_prefect(predicted):
    def logged() -> list[str]:
        logs = prefect_post("/logs/filter", {"logs": {"flow_run_id": {"any_": [predicted.flow_run_id]}}})
        return [log["message"] for log in logs]

    # the worker's log handler sends in batches, every 2 s by default
    wait_until(lambda: any("energy of 3 structure(s)" in line for line in logged()), timeout=20,
               what="the flow's own INFO line in Prefect's logs")
    lines = logged()
    assert any(line.startswith("read 3 structure(s), 24 atoms in all") for line in lines), lines
    assert any(line.startswith("batch 1 of 2: 2 structures in") for line in lines), lines
    assert any(line.startswith("batch 2 of 2: 1 structures in") for line in lines), lines


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (`make chromium`)")
def test_the_prefect_ui_shows_the_run_with_its_task_runs_and_logs(predicted, tmp_path):
    ui = SETTINGS.prefect_api.removesuffix("/api")
    page = f"{ui}/runs/flow-run/{predicted.flow_run_id}"
    # the logs have reached the API (test above); the page reads them from there
    wait_until(lambda: prefect_post("/logs/filter", {"logs": {"flow_run_id": {"any_": [predicted.flow_run_id]}}}),
               timeout=20, what="logs in Prefect")

    screenshot = tmp_path / "ml_predict-run-page.png"
    chromium(f"--screenshot={screenshot}", page)
    print(f"\nscreenshot of {page}: {screenshot}")
    assert screenshot.stat().st_size > 10_000

    logs_tab = chromium("--dump-dom", page)
    assert f"ml_predict-{predicted.id[:8]}" in logs_tab      # the run's name, as the dispatcher gave it
    assert "energy of 3 structure(s) with tensornet-matpes-pbe" in logs_tab     # a flow-run log line
    assert "batch 2 of 2: 1 structures in" in logs_tab        # a task-run log line

    task_runs_tab = chromium("--dump-dom", f"{page}?tab=Task+Runs")
    for name in ("read structures", "load model tensornet-matpes-pbe", "predict batch 1 of 2", "predict batch 2 of 2"):
        assert name in task_runs_tab, name
