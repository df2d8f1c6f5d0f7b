"""dataset_process against the real stack: upload → job → files; broken rows; kill -9 mid-job resumes; artifacts; cache."""

from __future__ import annotations

import io
import json
import signal
import uuid
import warnings

import httpx
import numpy as np
import pytest

from tests.integration.support import HOME, JOB_TYPE_TESTS, SETTINGS, create_key, wait_final, wait_until

pytestmark = JOB_TYPE_TESTS
warnings.filterwarnings("ignore")

FEATURIZE = {"step": "featurize", "featurizers": [{"name": "ElementProperty", "preset": "magpie"},
                                                  {"name": "DensityFeatures"}]}  # fmt: skip
VALIDATE = {"step": "validate", "schema": {"columns": {"exp_volume": {"checks": {"gt": 0}, "nullable": True}}}}


def dcdft_rows(names=None, copies: int = 1, seed: int = 0):
    from ase.collections import dcdft
    from pymatgen.io.ase import AseAtomsAdaptor

    from kiln.tasks.dataset.formats import Row

    rng = np.random.default_rng(seed)
    rows = []
    for copy in range(copies):
        for name in names or dcdft.names:
            structure = AseAtomsAdaptor.get_structure(dcdft[name])
            if copy:
                structure.perturb(0.01 * rng.random(), 0.0)
            rows.append(Row(f"{name}-{copy}", structure, {"exp_volume": dcdft.data[name].get("exp_volume")}))
    return rows


def extxyz_bytes(rows) -> bytes:
    from kiln.tasks.dataset.formats import extxyz_frame

    return "".join(extxyz_frame(row) for row in rows).encode()


@pytest.fixture(scope="module")
def key(stack) -> str:
    # a project of its own, with cache hits on (the default)
    return create_key(f"dataset-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def api(key):
    with httpx.Client(base_url=SETTINGS.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as h:
        yield h


def upload(api, name: str, content: bytes) -> dict:
    response = api.post("/api/v1/files", files=[("files", (name, content))])
    assert response.status_code == 201, response.text
    return response.json()[0]


def submit(api, input: dict, **extra) -> dict:
    response = api.post("/api/v1/jobs", json={"type": "dataset_process", "input": input, **extra})
    assert response.status_code == 202, response.text
    return response.json()


def read_parquet(api, job_id: str, name: str):
    import pyarrow.parquet as pq

    response = api.get(f"/api/v1/jobs/{job_id}/files/{name}")
    assert response.status_code == 200, response.text
    return pq.read_table(io.BytesIO(response.content)).to_pylist()


def test_an_upload_becomes_a_featurized_parquet_dataset(api, idle):
    from kiln.tasks.dataset.formats import read_dataset

    rows = dcdft_rows(["Si", "Cu", "Fe", "Al", "Na", "Mg"])
    stored = upload(api, "six.extxyz", extxyz_bytes(rows))
    job = submit(api, {"source": {"file": "six.extxyz"}, "steps": [FEATURIZE, VALIDATE], "partition_rows": 2})
    assert job["input"]["source"]["files"] == [stored]  # pinned to the content
    done = wait_final(api, job["id"], timeout=300)
    assert done["status"] == "completed", done["status_reason"]
    out = done["output"]
    assert (out["rows_in"], out["rows_out"], out["rows_failed"], out["partitions"]) == (6, 6, 0, 3)
    assert [step["step"] for step in out["steps"]] == ["read", "featurize", "validate"]
    names = {f["name"] for f in api.get(f"/api/v1/jobs/{job['id']}/files").json()}
    assert names == {"dataset.parquet", "errors.parquet"}
    table = read_parquet(api, job["id"], "dataset.parquet")
    assert [row["row_id"] for row in table] == [row.row_id for row in rows]
    assert all(row["MagpieData mean Number"] > 0 and row["density"] > 0 for row in table)
    # the structures are the uploaded ones (extxyz holds Cartesian positions; pymatgen keeps fractional ones)
    path = HOME + f"/{job['id']}.parquet"
    with open(path, "wb") as out_file:
        out_file.write(api.get(f"/api/v1/jobs/{job['id']}/files/dataset.parquet").content)
    for before, after in zip(rows, read_dataset(path)):
        np.testing.assert_allclose(after.structure.cart_coords, before.structure.cart_coords, rtol=0, atol=1e-12)
    assert read_parquet(api, job["id"], "errors.parquet") == []
    # each partition is a Prefect task run of the job's flow run (the run graph in the Prefect UI)
    task_runs = httpx.post(f"{SETTINGS.prefect_api}/task_runs/filter", json={
        "flow_runs": {"id": {"any_": [done["flow_run_id"]]}}}, timeout=30).json()  # fmt: skip
    names = {run["name"] for run in task_runs if run["state"]["type"] == "COMPLETED"}
    assert {"partition 1 of 3", "partition 2 of 3", "partition 3 of 3"} <= names, names


def test_broken_rows_end_in_the_errors_table_with_their_step_and_in_the_artifacts(api, idle):
    from pymatgen.core import Structure

    rows = dcdft_rows(["Si", "Cu", "Fe"])
    overlapping: Structure = rows[0].structure.copy()
    overlapping.append("Si", overlapping[0].coords + 0.1, coords_are_cartesian=True)
    rows.append(type(rows[0])("overlapping", overlapping, {"exp_volume": 20.0}))
    rows.append(type(rows[0])("out-of-range", rows[1].structure, {"exp_volume": -1.0}))
    text = extxyz_bytes(rows) + b"2\nnot an xyz comment line\nSi 0 0\n"  # an unparseable frame
    upload(api, "broken.extxyz", text)
    job = submit(api, {"source": {"file": "broken.extxyz"}, "steps": [FEATURIZE, VALIDATE], "partition_rows": 2})
    done = wait_final(api, job["id"], timeout=300)
    assert done["status"] == "completed", done["status_reason"]
    out = done["output"]
    assert (out["rows_in"], out["rows_out"], out["rows_failed"], out["quarantined"]) == (6, 3, 3, 2)
    errors = {e["row_id"]: e for e in read_parquet(api, job["id"], "errors.parquet")}
    assert errors["broken.extxyz:5"]["step"] == "read"
    assert errors["overlapping"]["step"] == "validate" and errors["overlapping"]["error_type"] == "OverlappingAtoms"
    assert errors["out-of-range"]["step"] == "validate" and errors["out-of-range"]["step_index"] == 1
    assert "exp_volume" in errors["out-of-range"]["message"]
    quarantine = read_parquet(api, job["id"], "quarantine.parquet")
    assert sorted(row["row_id"] for row in quarantine) == ["out-of-range", "overlapping"]
    # the report on the flow run, as the Prefect UI shows it
    artifacts = httpx.post(f"{SETTINGS.prefect_api}/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [done["flow_run_id"]]}}}, timeout=30).json()  # fmt: skip
    kinds = {a["type"]: a for a in artifacts}
    assert "| steps.1 validate | 5 | 3 | 0 | 2 |" in kinds["markdown"]["data"]
    table = json.loads(kinds["table"]["data"]) if isinstance(kinds["table"]["data"], str) else kinds["table"]["data"]
    assert sorted(row["row_id"] for row in table) == ["out-of-range", "overlapping"]


def test_policy_fail_fails_the_job_naming_the_row_and_step(api, idle):
    rows = dcdft_rows(["Si"])
    rows.append(type(rows[0])("negative", rows[0].structure, {"exp_volume": -5.0}))
    upload(api, "fail.extxyz", extxyz_bytes(rows))
    job = submit(api, {"source": {"file": "fail.extxyz"}, "steps": [{**VALIDATE, "policy": "fail"}]})
    done = wait_final(api, job["id"], timeout=300)
    assert done["status"] == "failed"
    assert "row 'negative' failed steps.0 (validate)" in done["status_reason"], done["status_reason"]
    # what was done is kept: the errors table names the row
    (error,) = read_parquet(api, job["id"], "errors.parquet")
    assert error["row_id"] == "negative" and error["step"] == "validate"


def test_the_same_content_and_pipeline_is_a_cache_hit(api, idle):
    rows = dcdft_rows(["Si", "Cu"])
    upload(api, "cached.extxyz", extxyz_bytes(rows))
    input = {"source": {"file": "cached.extxyz"}, "steps": [FEATURIZE]}
    first = wait_final(api, submit(api, input)["id"], timeout=300)
    assert first["status"] == "completed", first["status_reason"]
    # the same content under another name is the same dataset
    upload(api, "renamed.extxyz", extxyz_bytes(rows))
    again = submit(api, {**input, "source": {"file": "cached.extxyz"}})
    assert again["status"] == "cache_hit"
    assert {f["name"] for f in api.get(f"/api/v1/jobs/{again['id']}/files").json()} == {"dataset.parquet",
                                                                                      "errors.parquet"}  # fmt: skip
    # new content under the same name runs again
    upload(api, "cached.extxyz", extxyz_bytes(dcdft_rows(["Si", "Fe"])))
    assert submit(api, input)["status"] == "pending"


def test_an_earlier_job_s_output_is_a_dataset(api, idle):
    upload(api, "chain.extxyz", extxyz_bytes(dcdft_rows(["Si", "Cu", "Na"])))
    first = wait_final(api, submit(api, {"source": {"file": "chain.extxyz"}, "output_format": "cif-zip"})["id"],
                       timeout=300)  # fmt: skip
    assert first["status"] == "completed", first["status_reason"]
    second = submit(api, {"source": {"job": first["id"]}, "steps": [{"step": "filter", "elements_exclude": ["Na"]}],
                          "output_format": "extxyz"})  # fmt: skip
    # pinned: every file of the job; read: all but its errors table
    assert [f["name"] for f in second["input"]["source"]["files"]] == ["dataset-cif.zip", "errors.parquet"]
    done = wait_final(api, second["id"], timeout=300)
    assert done["status"] == "completed", done["status_reason"]
    assert (done["output"]["rows_in"], done["output"]["rows_out"]) == (3, 2)
    text = api.get(f"/api/v1/jobs/{second['id']}/files/dataset.extxyz").text
    assert text.count("Lattice=") == 2


def test_bad_input_is_a_4xx_naming_the_field(api):
    unknown = api.post("/api/v1/jobs", json={"type": "dataset_process", "input": {
        "source": {"file": "x"}, "steps": [FEATURIZE, {"step": "featurize", "featurizers": [{"name": "Foo"}]}]}})
    assert unknown.status_code == 422 and "input.steps.1.featurize.featurizers.0.name" in unknown.json()["detail"]
    missing = api.post("/api/v1/jobs", json={"type": "dataset_process", "input": {"source": {"file": "nope.cif"}}})
    assert missing.status_code == 422 and "input.source.files.0: no upload named 'nope.cif'" in missing.json()["detail"]
    no_job = api.post("/api/v1/jobs", json={"type": "dataset_process", "input": {"source": {"job": "no-such-job"}}})
    assert no_job.status_code == 422 and "input.source.job: no job 'no-such-job'" in no_job.json()["detail"]


def test_a_path_under_kiln_home_datasets_is_uploaded_where_it_lies(api):
    from pathlib import Path

    folder = Path(HOME) / "datasets" / "cifs"
    folder.mkdir(parents=True, exist_ok=True)
    from kiln.tasks.dataset.formats import cif_text

    for row in dcdft_rows(["Si", "Cu"]):
        (folder / f"{row.row_id}.cif").write_text(cif_text(row))
    response = api.post("/api/v1/files", json={"path": "datasets/cifs"})
    assert response.status_code == 201, response.text
    assert sorted(f["name"] for f in response.json()) == ["Cu-0.cif", "Si-0.cif"]
    # only KILN_HOME/datasets: the rest of KILN_HOME holds the databases and keys
    for elsewhere in ("/etc/passwd", "api-key", ".", "datasets/../kiln.db"):
        refused = api.post("/api/v1/files", json={"path": elsewhere})
        assert refused.status_code == 422 and "is not under" in refused.json()["detail"], elsewhere
    (folder / "leak").symlink_to(Path(HOME) / "api-key")
    assert "leak" not in {f["name"] for f in api.post("/api/v1/files", json={"path": "datasets/cifs"}).json()}


def test_smiles_rows_are_molecules(api, idle):
    upload(api, "mols.smi", b"CCO ethanol\nc1ccccc1 benzene\nnot-a-smiles\n")
    job = submit(api, {"source": {"file": "mols.smi"}, "output_format": "extxyz",
                       "steps": [{"step": "featurize", "featurizers": [{"name": "ElementProperty", "preset": "magpie"}]}]})
    done = wait_final(api, job["id"], timeout=300)
    assert done["status"] == "completed", done["status_reason"]
    assert (done["output"]["rows_out"], done["output"]["rows_failed"]) == (2, 1)


def test_a_dask_process_killed_mid_job_resumes_from_its_last_partition(api, stack, idle):
    import psutil

    # partitions that take a while: 600 perturbed crystals, 30 partitions
    upload(api, "big.extxyz", extxyz_bytes(dcdft_rows(copies=9, seed=1)[:600]))
    job = submit(api, {"source": {"file": "big.extxyz"}, "partition_rows": 20,
                       "steps": [FEATURIZE, {"step": "featurize", "featurizers": [{"name": "GlobalSymmetryFeatures"}]}]},
                 resources={"max_retry_count": 1})  # fmt: skip

    def partitions_done() -> int:
        # each finished partition is persisted under the job's work dir (KILN_HOME/results/datasets/<job id>)
        return len(list((SETTINGS.results_dir / "datasets" / job["id"]).glob("done-*.pkl")))

    wait_until(lambda: partitions_done() >= 2, timeout=300, interval=1, what="two partitions to finish")
    worker = psutil.Process(stack.procs["worker"].pid)
    for process in worker.children():
        if "spawn_main" in " ".join(process.cmdline()):
            process.kill()
    done = wait_final(api, job["id"], timeout=900)
    assert done["status"] == "completed", done["status_reason"]
    assert done["attempt"] == 2
    out = done["output"]
    assert out["resumed_partitions"] >= 2 and out["partitions"] == 30
    assert out["rows_in"] == 600 and out["rows_out"] + out["rows_failed"] == 600


def test_a_worker_with_scheduler_address_runs_the_job_on_that_dask_cluster(api, stack, idle):
    """`kiln worker start --scheduler-address`: a scheduler and two workers started with the `dask` CLI, as on a
    cluster of machines; the flow and every partition run on those workers, and the dataset is matminer's own."""
    import os

    from distributed import Client
    from matminer.featurizers.composition import ElementProperty
    from matminer.featurizers.structure import DensityFeatures

    from tests.integration.support import dask_cluster

    # the environment the README asks of the cluster's Dask workers: the same installation (here: the session's
    # PYTHONPATH, which holds a lab's job type), KILN_HOME (shared) and PREFECT_API_URL; no other KILN_/PREFECT_ one
    env = {name: value for name, value in os.environ.items() if not name.startswith(("KILN_", "PREFECT_"))}
    env.update(KILN_HOME=HOME, PREFECT_API_URL=SETTINGS.prefect_api)
    rows = dcdft_rows(["Si", "Cu", "Fe", "Al", "Na", "Mg", "Ti", "Zn", "Ge", "Mo", "Ag", "W"])

    def ran_here(dask_worker) -> dict[str, list[str]]:
        """What a worker of the cluster ran to its end: the Dask keys of partitions and of flow runs (sent by value:
        the cluster's workers need not import the tests)."""
        keys = {entry[0] for entry in dask_worker.state.log
                if len(entry) >= 3 and isinstance(entry[0], str) and entry[2] == "memory"}  # fmt: skip
        return {"partitions": sorted(k for k in keys if k.startswith("process_partition-")),
                "flow_runs": sorted(k for k in keys if k.startswith("kiln-"))}  # fmt: skip

    with dask_cluster(2, env, stack.logs_dir / "dask-cluster.log") as address:
        try:
            stack.stop("worker")
            stack.start_worker(name="on-cluster", extra=["--scheduler-address", address])
            upload(api, "cluster.extxyz", extxyz_bytes(rows))
            job = submit(api, {"source": {"file": "cluster.extxyz"}, "steps": [FEATURIZE], "partition_rows": 2})
            done = wait_final(api, job["id"], timeout=300)
            assert done["status"] == "completed", done["status_reason"]
            with Client(address, timeout=60) as external:
                ran = external.run(ran_here)
        finally:
            stack.stop("worker")
            stack.start_worker()
    out = done["output"]
    assert (out["rows_in"], out["rows_out"], out["rows_failed"], out["partitions"]) == (12, 12, 0, 6)
    # the flow run ran on one of the cluster's workers, and its six partitions on both of them
    # (a flow run's Dask key is `kiln-<flow run id>-<one per submission>`: it was submitted once)
    flow_runs = [key for keys in ran.values() for key in keys["flow_runs"]]
    assert len(flow_runs) == 1 and flow_runs[0].startswith(f"kiln-{done['flow_run_id']}-"), ran
    assert sum(len(keys["partitions"]) for keys in ran.values()) == 6, ran
    assert all(keys["partitions"] for keys in ran.values()), ran
    # each row's features are those matminer computes for it here
    magpie, density = ElementProperty.from_preset("magpie"), DensityFeatures()
    table = read_parquet(api, job["id"], "dataset.parquet")
    assert [row["row_id"] for row in table] == [row.row_id for row in rows]
    for row, got in zip(rows, table):
        expected = dict(zip(magpie.feature_labels(), magpie.featurize(row.structure.composition)))
        expected |= dict(zip(density.feature_labels(), density.featurize(row.structure)))
        np.testing.assert_allclose([got[name] for name in expected], list(expected.values()), rtol=1e-9)
