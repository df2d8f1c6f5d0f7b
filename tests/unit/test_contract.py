"""The pieces every part agrees on: statuses, the Prefect state mapping, resources, bands, job types, settings."""

from __future__ import annotations

import pytest
from prefect.client.schemas.objects import StateType

from kiln.deployments.project import DeploymentSpec, load_project
from kiln.dispatch.runs import deployment_schedule
from kiln.dispatch.runs import job_of_tags, reason_of_state, status_of_state
from kiln.registry import job_types
from kiln.schemas import JobStatus, Resources
from kiln.schemas.statuses import FINAL_STATUSES
from kiln.settings import KilnSettings


@pytest.mark.parametrize(
    "state, status",
    [
        (StateType.SCHEDULED, JobStatus.QUEUED),
        (StateType.PENDING, JobStatus.QUEUED),
        (StateType.RUNNING, JobStatus.RUNNING),
        (StateType.PAUSED, JobStatus.RUNNING),
        (StateType.COMPLETED, JobStatus.COMPLETED),
        (StateType.FAILED, JobStatus.FAILED),
        (StateType.CRASHED, JobStatus.FAILED),
        (StateType.CANCELLED, JobStatus.CANCELLED),
        (StateType.CANCELLING, None),
    ],
)
def test_every_prefect_state_maps_to_one_job_status(state, status):
    assert status_of_state(state) is status
    assert status_of_state(state.value) is status


def test_every_prefect_state_type_is_mapped_or_deliberately_not():
    for state in StateType:
        assert status_of_state(state) is not None or state is StateType.CANCELLING


def test_reasons_say_what_happened():
    assert reason_of_state("CRASHED", "worker died") == "crashed: worker died"
    assert "Prefect UI" in reason_of_state("FAILED", None)
    assert reason_of_state("CANCELLED", None) == "cancelled"


def test_final_statuses():
    assert {s for s in JobStatus if s.is_final} == FINAL_STATUSES
    assert not JobStatus.RUNNING.is_final


def test_job_id_is_read_from_tags():
    assert job_of_tags(["kiln", "project:p", "job:abc"]) == "abc"
    assert job_of_tags(["kiln"]) is None


def test_resources_say_which_requirement_no_worker_meets():
    offers = {"cpu_count": 2, "gpu_count": 0, "ram_gb": 23.4, "vram_gb": 0, "storage_gb": 50, "gpu_names": []}
    assert Resources().unmet_by(offers) is None
    assert Resources(cpu_count=2, min_ram_gb=16).unmet_by(offers) is None
    assert Resources(gpu_count=1).unmet_by(offers) == "gpu_count=1"
    assert Resources(cpu_count=4).unmet_by(offers) == "cpu_count=4"
    assert Resources(min_ram_gb=64).unmet_by(offers) == "min_ram_gb=64"
    assert Resources(gpu_name="NVIDIA RTX 4090").unmet_by(offers) == "gpu_name='NVIDIA RTX 4090'"


def test_resources_refuse_nonsense():
    with pytest.raises(ValueError):
        Resources(gpu_count=-1)
    with pytest.raises(ValueError):
        Resources(max_timeout_run_ms=10)
    with pytest.raises(ValueError):
        Resources(colour="red")


@pytest.mark.parametrize("priority, queue", [(1000, "urgent"), (100, "urgent"), (99, "high"), (10, "high"),
                                             (9, "normal"), (0, "normal"), (-1, "low"), (-10**9, "low")])
def test_priorities_fall_into_bands(priority, queue):
    assert load_project().band_for(priority).queue == queue


def test_kilns_own_job_types_are_registered_as_entry_points():
    assert set(job_types()) >= {"sleep", "ml_predict", "hpc_submit", "simulation", "batch_run", "llm_proxy"}


@pytest.mark.parametrize("name", sorted(job_types()))
def test_a_job_type_is_one_object_its_deployment_and_flow_are_read_from(name):
    job_type = job_types()[name]
    assert job_type.available
    assert job_type.flow.name == name, "a type's flow carries the type's name (the Prefect UI groups runs by it)"
    spec = DeploymentSpec.of_job_type(job_type, load_project().default_queue)
    assert (spec.module, spec.function) == (f"kiln.flows.{name}", job_type.flow.fn.__name__)
    assert spec.serves_jobs and set(spec.tags) >= {"kiln", f"type:{name}"} and spec.work_queue_name == "normal"


@pytest.mark.parametrize("name", sorted(job_types()))
def test_input_models_are_strict_and_every_field_says_what_it_means(name):
    model = job_types()[name].input_model
    assert model.model_config.get("extra") == "forbid"
    for field_name, field in model.model_fields.items():
        assert field.description, f"{name} input field {field_name!r} has no description"


def test_a_types_default_resources_are_under_what_a_job_asks_for():
    from dataclasses import replace

    job_type = replace(job_types()["sleep"], default_resources=Resources(cpu_count=2, min_ram_gb=4))
    assert job_type.resources_for(None) == Resources(cpu_count=2, min_ram_gb=4)
    merged = job_type.resources_for(Resources(cpu_count=1))
    assert (merged.cpu_count, merged.min_ram_gb) == (1, 4)


def test_prefect_yaml_holds_only_the_operators_deployments():
    assert all(not spec.serves_jobs for spec in load_project().deployments)


def test_the_example_scheduled_batch_run_is_off_until_an_operator_turns_it_on():
    (nightly,) = [spec for spec in load_project().deployments if spec.name == "nightly-screen"]
    assert nightly.module == "kiln.flows.batch_run" and "project:default" in nightly.tags
    schedule = deployment_schedule(nightly.schedules[0])
    assert schedule.active is False
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "UTC")


def test_the_example_trigger_is_off_until_an_operator_turns_it_on():
    (example,) = [spec for spec in load_project().deployments if spec.triggers]
    assert example.module == "kiln.flows.simulation" and "project:default" in example.tags
    (trigger,) = example.triggers
    assert trigger["enabled"] is False and trigger["expect"] == ["kiln.job.completed"]
    assert trigger["match"]["kiln.job.type"] == "ml_predict"


def test_a_project_file_may_schedule_by_interval_too(tmp_path):
    path = tmp_path / "prefect.yaml"
    path.write_text(PROJECT_FILE)
    (spec,) = load_project(path).deployments
    assert spec.parameters == {"input": {"source": "/data/x.jsonl"}} and not spec.serves_jobs
    schedule = deployment_schedule(spec.schedules[0])
    assert schedule.active and schedule.schedule.interval.total_seconds() == 3600


PROJECT_FILE = """
kiln:
  work_pool: kiln
  bands: [{queue: normal, min_priority: null, prefect_priority: 1}]
deployments:
  - name: hourly
    entrypoint: flows/batch_run.py:batch_run
    parameters: {input: {source: /data/x.jsonl}}
    schedules: [{interval: 3600}]
    work_pool: {name: kiln, work_queue_name: normal}
"""


def test_settings_defaults_and_env(monkeypatch, tmp_path):
    for name in ("KILN_HOME", "KILN_DATABASE_URL", "KILN_PREFECT_DATABASE_URL", "KILN_API_PORT", "KILN_PREFECT_API_URL"):
        monkeypatch.delenv(name, raising=False)
    defaults = KilnSettings()
    assert str(defaults.home) == "~/.kiln" and defaults.api_port == 8000 and defaults.prefect_port == 4200
    assert defaults.prefect_api == "http://127.0.0.1:4200/api"
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.setenv("KILN_API_PORT", "8123")
    monkeypatch.setenv("KILN_PREFECT_DATABASE_URL", "postgresql+asyncpg://u:p@db/prefect")
    settings = KilnSettings()
    assert settings.job_index_url == f"sqlite+aiosqlite:///{tmp_path / 'kiln.db'}"
    assert settings.prefect_db_url == "postgresql+asyncpg://u:p@db/prefect"
    assert settings.api_url == "http://127.0.0.1:8123"
    for name, field in KilnSettings.model_fields.items():
        assert field.description, f"setting {name} has no description"


def test_an_input_may_say_it_is_not_cacheable():
    from kiln.schemas.llm_proxy import LlmProxyInput

    llm = job_types()["llm_proxy"]
    call = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert llm.cacheable_for(LlmProxyInput(**call, temperature=0))
    assert not llm.cacheable_for(LlmProxyInput(**call, temperature=0.7))
    assert not job_types()["batch_run"].cacheable_for(None)
