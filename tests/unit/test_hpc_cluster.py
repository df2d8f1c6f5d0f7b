"""The cluster block → dask-jobqueue job scripts (SLURM and PBS, no scheduler needed), limits and batch states."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kiln.blocks.cluster import HpcCluster, format_walltime, memory_gb, walltime_seconds
from kiln.schemas.hpc_submit import HpcSubmitInput
from kiln.schemas.resources import Resources
from kiln.tasks.hpc.batch import BatchState, failure_reason, parse_qstat, parse_squeue
from kiln.tasks.hpc.runner import merge_outputs


def script(block: HpcCluster, resources: Resources = Resources()) -> str:
    cluster = block.dask_cluster(resources, job_name="kiln-abcd1234", asynchronous=False)
    try:
        return cluster.job_script()
    finally:
        cluster.close()


def test_pbs_job_script_carries_the_block_and_the_job_resources():
    block = HpcCluster(
        scheduler="pbs", queue="workq", account="matsci", cores=8, memory="16GB", walltime="02:00:00",
        processes=2, job_extra_directives=["-l place=scatter"],
        job_script_prologue=["module load python/3.11", "source /opt/venv/bin/activate"],
        python="/opt/venv/bin/python",
    )
    text = script(block, Resources(cpu_count=4, min_ram_gb=8, max_timeout_run_ms=5_400_000))
    assert text.startswith("#!/usr/bin/env bash")
    assert "#PBS -N kiln-abcd1234" in text
    assert "#PBS -q workq" in text
    assert "#PBS -A matsci" in text
    assert "#PBS -l select=1:ncpus=4:mem=" in text
    assert "#PBS -l walltime=01:30:00" in text
    assert "#PBS -l place=scatter" in text
    assert "#PBS -o /dev/null" in text and "#PBS -e /dev/null" in text
    assert "module load python/3.11\nsource /opt/venv/bin/activate\n" in text
    assert "/opt/venv/bin/python -m distributed.cli.dask_worker" in text
    # the job's 4 cores shared by the block's 2 processes
    assert "--nworkers 2" in text and "--nthreads 2" in text


def test_pbs_job_script_falls_back_to_the_block_sizes():
    text = script(HpcCluster(scheduler="pbs", queue="short", cores=2, memory="4GB", walltime="00:30:00"))
    assert "#PBS -l select=1:ncpus=2:mem=" in text
    assert "#PBS -l walltime=00:30:00" in text
    assert "#PBS -A" not in text


def test_slurm_job_script_carries_the_block_and_the_job_resources():
    block = HpcCluster(scheduler="slurm", queue="debug", account="proj", cores=4, memory="8GB",
                       job_extra_directives=["--qos=long"], log_directory="/tmp/kiln-hpc-logs")
    text = script(block, Resources(cpu_count=2, min_ram_gb=3, max_timeout_run_ms=61_000))
    for line in ("#SBATCH -J kiln-abcd1234", "#SBATCH -p debug", "#SBATCH -A proj", "#SBATCH --cpus-per-task=2",
                 "#SBATCH -t 00:02:00", "#SBATCH --nodes=1", "#SBATCH --qos=long"):
        assert line in text
    assert "#SBATCH --mem=3G" in text
    assert "/dev/null" not in text


@pytest.mark.parametrize(
    ("resources", "named"),
    [
        (Resources(cpu_count=9), "resources.cpu_count=9 exceeds cluster 'hpc''s 8 cores per batch job"),
        (Resources(min_ram_gb=64), "resources.min_ram_gb=64 exceeds cluster 'hpc''s 16GB per batch job"),
        (Resources(max_timeout_run_ms=7_300_000), "walltime 02:00:00"),
        (Resources(max_node_count=5), "resources.max_node_count=5 exceeds cluster 'hpc''s 4 batch jobs"),
        (Resources(gpu_count=1), "offers no GPUs"),
    ],
)
def test_what_the_cluster_cannot_meet_is_named(resources, named):
    block = HpcCluster(scheduler="pbs", cores=8, memory="16GB", walltime="02:00:00", max_jobs=4)
    assert named in block.unmet(resources, "hpc")


def test_what_the_cluster_can_meet_passes():
    block = HpcCluster(scheduler="slurm", cores=8, memory="16GB", walltime="02:00:00", max_jobs=4)
    assert block.unmet(Resources(cpu_count=8, min_ram_gb=16, max_timeout_run_ms=7_200_000, max_node_count=4)) is None


def test_block_fields_are_checked():
    with pytest.raises(ValidationError, match="walltime"):
        HpcCluster(scheduler="slurm", walltime="ten minutes")
    with pytest.raises(ValidationError, match="memory"):
        HpcCluster(scheduler="slurm", memory="lots")
    with pytest.raises(ValidationError, match="scheduler"):
        HpcCluster(scheduler="lsf")


def test_walltimes_and_memory_sizes():
    assert walltime_seconds("01:30:00") == 5400
    assert walltime_seconds("1-00:00:00") == 86400
    assert format_walltime(61) == "00:02:00"
    assert format_walltime(3600) == "01:00:00"
    assert memory_gb("512MB") == pytest.approx(0.512)
    assert memory_gb("2GiB") == 2


def test_batch_states_name_walltime_memory_and_node_failures():
    states = parse_squeue("12|TIMEOUT|localhost|TimeLimit\n13|RUNNING|localhost|None\n14|OUT_OF_MEMORY|n1|None\n")
    assert "walltime (00:01:00)" in failure_reason("slurm", states["12"], walltime="00:01:00", memory="1GB")
    assert failure_reason("slurm", states["13"], walltime="00:01:00", memory="1GB") is None
    assert "out of memory (1GB" in failure_reason("slurm", states["14"], walltime="00:01:00", memory="1GB")
    node = failure_reason("slurm", BatchState("15", "NODE_FAIL", "n7"), walltime="1", memory="1")
    assert "n7" in node and "node failed" in node
    assert failure_reason("slurm", BatchState("16", "COMPLETED"), walltime="1", memory="1") is None


def test_pbs_exit_statuses_name_the_kill():
    qstat = (
        "Job Id: 101.pbs\n    job_state = F\n    exec_host = n3/0*4\n    Exit_status = -29\n\n"
        "Job Id: 102.pbs\n    job_state = R\n    exec_host = n4/0*4\n"
    )
    states = parse_qstat(qstat)
    assert set(states) == {"101.pbs", "102.pbs"}
    assert "walltime (01:00:00)" in failure_reason("pbs", states["101.pbs"], walltime="01:00:00", memory="4GB")
    assert failure_reason("pbs", states["102.pbs"], walltime="01:00:00", memory="4GB") is None
    oom = failure_reason("pbs", BatchState("103.pbs", "F", exit_code="-27"), walltime="1", memory="4GB")
    assert "out of memory (4GB" in oom


def test_hpc_submit_input():
    assert HpcSubmitInput(callable="spin", ntasks=3).target == "spin"
    assert HpcSubmitInput(command=["echo", "hi"]).target == "command"
    with pytest.raises(ValidationError, match="exactly one"):
        HpcSubmitInput(callable="spin", command=["true"])
    with pytest.raises(ValidationError, match="registered callable"):
        HpcSubmitInput(callable="os:system")
    with pytest.raises(ValidationError, match="one per task"):
        HpcSubmitInput(callable="spin", ntasks=2, task_kwargs=[{}])
    per_task = HpcSubmitInput(callable="spin", ntasks=2, kwargs={"seconds": 1}, task_kwargs=[{}, {"seconds": 2}])
    assert per_task.kwargs_of_tasks() == [{"seconds": 1}, {"seconds": 2}]


def test_merge_gives_mean_and_spread_of_shared_numbers():
    merged = merge_outputs([{"task_id": 1, "e": 1.0, "name": "a"}, {"task_id": 2, "e": 3.0, "name": "b"}])
    assert merged == {"e": {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0}}
