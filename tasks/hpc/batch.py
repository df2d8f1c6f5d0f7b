"""The batch system's own view of kiln's batch jobs: their states, why they ended, and removing them."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

# SLURM job states that end a job abnormally, and what a user should read about each
SLURM_FAILURES = {
    "TIMEOUT": "hit its walltime ({walltime}) and was killed by SLURM; ask for a longer max_timeout_run_ms, "
    "or register a cluster with a longer walltime",
    "OUT_OF_MEMORY": "ran out of memory ({memory} per batch job) and was killed by SLURM; ask for more min_ram_gb",
    "NODE_FAIL": "lost its node ({node}): the node failed",
    "BOOT_FAIL": "could not start: its node failed to boot",
    "PREEMPTED": "was preempted by SLURM",
    "DEADLINE": "missed its deadline",
    "FAILED": "failed (exit code {exit_code})",
    "CANCELLED": "was cancelled outside kiln (scancel)",
}
ENDED_WELL = {"COMPLETED", "COMPLETING"}

# PBS Pro exit statuses of jobs the server killed
PBS_FAILURES = {
    -29: "hit its walltime ({walltime}) and was killed by PBS; ask for a longer max_timeout_run_ms, "
    "or register a cluster with a longer walltime",
    -27: "ran out of memory ({memory} per batch job) and was killed by PBS; ask for more min_ram_gb",
    -25: "used up its CPU time and was killed by PBS",
    -11: "lost its node ({node}): the node failed",
}


@dataclass(frozen=True)
class BatchState:
    job_id: str
    state: str
    node: str = ""
    exit_code: str = ""
    # why a queued job waits, as the scheduler says it (SLURM: Priority, Resources, BeginTime, …)
    reason: str = ""

    @property
    def waiting(self) -> bool:
        return self.state in ("PENDING", "Q", "H")


async def _run(*argv: str, timeout: float = 15) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        process.kill()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {process.returncode}: {err.decode().strip()}")
    return out.decode()


def parse_squeue(text: str) -> dict[str, BatchState]:
    """`squeue --states=all -h -o '%i|%T|%N|%r'` lines by job id."""
    states = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2:
            states[parts[0]] = BatchState(
                parts[0], parts[1], parts[2] if len(parts) > 2 else "", reason=parts[3] if len(parts) > 3 else ""
            )
    return states


def parse_qstat(text: str) -> dict[str, BatchState]:
    """`qstat -x -f` output by job id: job_state, exec_host and Exit_status of each job."""
    states: dict[str, BatchState] = {}
    for block in re.split(r"\n(?=Job Id:)", text.strip()):
        match = re.match(r"Job Id:\s*(\S+)", block)
        if not match:
            continue
        fields = dict(re.findall(r"^\s+(\w+) = (.*)$", block, flags=re.MULTILINE))
        job_id = match.group(1)
        states[job_id] = BatchState(
            job_id, fields.get("job_state", "?"), fields.get("exec_host", ""), fields.get("Exit_status", "")
        )
    return states


async def batch_states(scheduler: str, job_ids: list[str]) -> dict[str, BatchState]:
    """What the batch system says of these jobs, including ones that ended a while ago."""
    if not job_ids:
        return {}
    if scheduler == "slurm":
        # --states=all keeps jobs that ended within slurmctld's MinJobAge
        out = await _run("squeue", "--states=all", "-h", "-o", "%i|%T|%N|%r", "-j", ",".join(job_ids))
        return parse_squeue(out)
    out = await _run("qstat", "-x", "-f", *job_ids)
    return parse_qstat(out)


def failure_reason(scheduler: str, state: BatchState, *, walltime: str, memory: str) -> str | None:
    """Why a batch job ended abnormally, in words a user can act on; None while it runs or when it ended well."""
    if scheduler == "slurm":
        # squeue shows e.g. CANCELLED by 0; the state's first word is what matters
        name = state.state.split()[0].rstrip("+")
        template = SLURM_FAILURES.get(name)
    else:
        if state.state != "F":
            return None
        try:
            code = int(state.exit_code)
        except ValueError:
            return None
        template = PBS_FAILURES.get(code) or (f"failed (exit status {code})" if code else None)
    if template is None:
        return None
    return f"batch job {state.job_id} " + template.format(
        walltime=walltime, memory=memory, node=state.node or "unknown", exit_code=state.exit_code or "?"
    )


async def remove_batch_jobs(scheduler: str, job_ids: list[str], job_name: str | None = None) -> None:
    """scancel / qdel: the batch jobs leave the queue at once, whatever Dask's own shutdown does.

    On SLURM by the job name kiln gave them (scancel ANDs a name with ids, so the name alone): it
    catches too a batch job whose sbatch had not yet answered with its id.
    """
    if scheduler == "slurm" and job_name:
        command = ["scancel", f"--name={job_name}"]
    elif job_ids:
        command = ["scancel", *job_ids] if scheduler == "slurm" else ["qdel", "-W", "force", *job_ids]
    else:
        return
    try:
        await _run(*command)
    except Exception as exc:  # noqa: BLE001 - jobs that already ended make scancel/qdel complain
        log.info("%s: %s", command[0], exc)
