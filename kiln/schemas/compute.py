"""The GPU job API's container jobs (/api/v1/compute/jobs): its request and job shapes, and how kiln runs one: a
BATCH job as a plugin_exec job of a registered plugin, a PERSISTENT one as an mcp_host deployment of its image.

Every field of that API's request body is a field here, so a body written for it is taken verbatim. What its
document forbids is a 422 naming the field (max_timeout_run_ms below 60000); what it allows and kiln's sandbox
cannot honour is a 400 naming the field and why (`refusals`).
"""

from __future__ import annotations

import math
import re
import secrets
from datetime import datetime
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, Field, field_serializer, field_validator

from kiln.schemas.jobs import Job, JobCreate, iso
from kiln.schemas.plugins import Limits, check_env_names
from kiln.schemas.resources import MAX_TIMEOUT_MS, Resources
from kiln.schemas.statuses import JobStatus
from kiln.schemas.strict import StrictRequest

# JobRow.submitted_via of a job submitted through these routes
SUBMITTED_VIA = "compute"
# fields a body may carry a credential in, at any depth (a volume has its own `secret`): never echoed, stored or logged
SECRET_FIELDS = frozenset({"secret", "sshkey"})
HIDDEN = "<hidden>"
# the flow's timeout (resources.max_timeout_run_ms) runs this long past the container's wall time: unpacking comes
# before the container and collecting /out after it, so a container out of time ends with the sandbox's own reason
# ('wall time limit (900 s)'), and Prefect's timeout is the backstop
RUN_GRACE_MS = 30_000
# kiln's bound on every timeout, past the document's minimums: a year
# the most cores the sandbox gives one run (kiln.schemas.plugins.Limits.cpus)
MAX_CPUS = 64
# a bound no machine reaches, so that min_ram_gb in MB stays a number
MAX_RAM_GB = 2**20
HEX_PREFIX = re.compile(r"(sha256:)?([0-9a-f]{12,64})")
# a PERSISTENT job's MCP deployment: the image's name and a suffix of its own, so that two never share a URL
PERSISTENT_NAME = "{image}-{suffix}"


class Volume(StrictRequest):
    """A volume the GPU job API mounts from a registry image; kiln refuses any (it pulls nothing from a registry)."""

    image: str | None = Field(None, description="The volume's image in a registry.")
    mount: str | None = Field(None, description="Where the volume would be mounted in the container.")
    registry: str | None = Field(None, description="The registry the volume's image comes from.")
    secret: str | None = Field(None, description="The registry's password or token; never echoed back.")
    tag: str | None = Field(None, description="The volume image's tag.")
    user: str | None = Field(None, description="The registry user.")


class DockerParameters(StrictRequest):
    """A container job's own parameters: the image to run and its environment; the rest kiln refuses when given."""

    image: str = Field(
        description="A registered kiln plugin's name (GET /api/v1/plugins; `kiln plugins add NAME --image FILE` or "
        "POST /api/v1/plugins registers one). kiln pulls nothing from a registry: any other name is a 404 naming "
        "the registered ones."
    )
    tag: str | None = Field(
        None, description="'latest', or the plugin's image digest ('sha256:…', or its first 12 or more hex digits); "
        "the plugin's image when absent. Any other tag is a 404.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables of the container, over the plugin's own "
        "(the plugin_exec job's input.env)."
    )
    allowed_ips: list[str] | None = Field(
        None, description="Addresses allowed to reach the container; non-empty is a 400: the sandbox has no network."
    )
    ports: list[int] | None = Field(
        None, description="Container ports to expose; non-empty is a 400: the sandbox has no network."
    )
    host: str | None = Field(None, description="A host to run on; given, a 400: kiln's dispatcher chooses the worker.")
    imagesrc: str | None = Field(
        None, description="Where to pull the image from; given, a 400: kiln runs registered plugins and pulls nothing."
    )
    secret: str | None = Field(
        None, description="A registry credential; given, a 400 (kiln pulls nothing). Never echoed back, stored or "
        "logged.",
    )
    sshkey: str | None = Field(
        None, description="An SSH public key for the container; given, a 400: the sandbox runs no SSH and has no "
        "network. Never echoed back, stored or logged.",
    )
    user: str | None = Field(
        None, description="The user to run as; given, a 400: the sandbox runs every container as uid 65534."
    )
    volumes: list[Volume] | None = Field(
        None, description="Registry images mounted as volumes; non-empty is a 400: kiln pulls nothing."
    )

    _env_names = field_validator("env")(check_env_names)


class ContainerParameters(StrictRequest):
    """What the job runs: its type and that type's parameters."""

    type: str = Field(description="The job's kind: 'docker' is the one kiln runs; any other is a 400.")
    parameters: DockerParameters = Field(description="The container to run.")


# what kiln's sandbox cannot honour, by field of the container's parameters: given, each is a 400 saying why
UNHONOURED = {
    "ports": "the sandbox has no network: nothing can reach a port of the container",
    "allowed_ips": "the sandbox has no network: there is nothing to allow",
    "host": "kiln's dispatcher chooses the worker; a job cannot name a host",
    "imagesrc": "kiln pulls nothing from a registry: register the image as a plugin (`kiln plugins add NAME "
    "--image FILE`, POST /api/v1/plugins) and name it in `image`",
    "secret": "kiln pulls nothing from a registry, so it logs in to none",
    "sshkey": "the sandbox runs no SSH server and has no network",
    "user": "the sandbox runs every container as uid 65534 (nobody)",
    "volumes": "kiln pulls no volume images from a registry: upload files with POST /api/v1/files and name them in "
    "a plugin_exec job's input.files (POST /api/v1/jobs)",
}


class ComputeJobCreate(StrictRequest):
    """A GPU job API job request, taken verbatim; kiln runs it as a plugin_exec job of the plugin `image` names."""

    parameters: ContainerParameters = Field(description="The container to run.")
    title: str = Field(description="The job's title, echoed back.")
    description: str | None = Field(None, description="An optional description, echoed back.")
    task: Literal["BATCH", "PERSISTENT"] = Field(
        description="BATCH: a plugin_exec job, the container run once to its end. PERSISTENT: an mcp_host job, the "
        "container serving MCP over stdio until the job is cancelled (DELETE), restarted when it dies, at the URL "
        "its container_access_tokens give."
    )
    cpu_count: int = Field(
        0, ge=0, le=MAX_CPUS, description="CPU cores the job needs: a worker must offer them (resources.cpu_count), "
        "and when above 0 they are the container's CPU limit (limits.cpus), unless the plugin's is higher.",
    )
    gpu_count: int = Field(
        0, ge=0, description="GPUs the job needs (resources.gpu_count); the job waits until a worker offers them, "
        "past max_timeout_assign_ms it fails.",
    )
    gpu_name: str | None = Field(None, description="A GPU model a worker must have (resources.gpu_name).")
    gpu_registry_uuid: str | None = Field(
        None, description="A GPU of a GPU registry; given, a 400: kiln has none, name the model in gpu_name."
    )
    min_ram_gb: float = Field(
        0, ge=0, le=MAX_RAM_GB, description="Memory in GB the job needs: a worker must have it (resources.min_ram_gb), "
        "and when above 0 it is the container's memory limit (limits.memory_mb), unless the plugin's is higher.",
    )
    min_vram_gb: float = Field(0, ge=0, description="GPU memory in GB a worker must have (resources.min_vram_gb).")
    min_storage_gb: float = Field(0, ge=0, description="Free disk in GB a worker must have (resources.min_storage_gb).")
    max_timeout_run_ms: int = Field(
        ge=60_000, le=MAX_TIMEOUT_MS - RUN_GRACE_MS, description="BATCH: longest the container may run, its wall time "
        f"(limits.wall_seconds); the job's flow times out {RUN_GRACE_MS // 1000} s later "
        "(resources.max_timeout_run_ms), time to unpack and to collect /out. PERSISTENT: not applied (the document "
        "defines it for BATCH jobs): the container serves until the job is cancelled.",
    )
    max_timeout_assign_ms: int = Field(
        300_000, ge=300_000, le=MAX_TIMEOUT_MS, description="Longest the job may wait for a worker to pick it up; "
        "past it the job fails (resources.max_timeout_assign_ms).",
    )
    max_timeout_start_ms: int = Field(
        300_000, ge=120_000, le=MAX_TIMEOUT_MS, description="Longest from a worker picking the job up until it runs; "
        "past it the job fails (resources.max_timeout_start_ms).",
    )
    max_retry_count: int = Field(
        0, ge=0, le=10, description="How often a failed job runs again (resources.max_retry_count; kiln allows 10)."
    )
    max_node_count: int = Field(
        1, ge=1, description="Most nodes the job may span (resources.max_node_count); a container runs on one."
    )

    def refusals(self) -> list[dict[str, Any]]:
        """What kiln cannot run as asked, each {loc, msg, type} naming the field; never a secret's value."""
        found = []
        if self.parameters.type != "docker":
            found.append((("parameters", "type"), f"kiln runs 'docker' jobs only (a registered plugin's image), "
                          f"not {self.parameters.type!r}"))  # fmt: skip
        docker = self.parameters.parameters
        for name, why in UNHONOURED.items():
            if getattr(docker, name):
                found.append((("parameters", "parameters", name), why))
        if self.gpu_registry_uuid:
            found.append((("gpu_registry_uuid",), "kiln has no GPU registry: name the GPU model in gpu_name"))
        return [{"loc": list(loc), "msg": msg, "type": "not_supported"} for loc, msg in found]

    def kiln_job(self, plugin_limits: Limits) -> JobCreate:
        """The kiln job that runs this request: BATCH, a plugin_exec job of the plugin `image` names, with the body's
        env and its wall time; PERSISTENT, an mcp_host job serving that plugin's image over stdio at a deployment
        named after it (PERSISTENT_NAME), with the body's env. Either way the body's cores and memory are minimums
        over the plugin's limits (`plugin_limits`), and its resource fields the job's resources."""
        limits: dict[str, Any] = {}
        if self.cpu_count > 0:
            limits["cpus"] = max(float(self.cpu_count), plugin_limits.cpus)
        if self.min_ram_gb > 0:
            limits["memory_mb"] = max(math.ceil(self.min_ram_gb * 1024), plugin_limits.memory_mb)
        docker = self.parameters.parameters
        persistent = self.task == "PERSISTENT"
        resources = Resources(
            cpu_count=self.cpu_count, gpu_count=self.gpu_count, gpu_name=self.gpu_name, min_ram_gb=self.min_ram_gb,
            min_vram_gb=self.min_vram_gb, min_storage_gb=self.min_storage_gb,
            max_timeout_assign_ms=self.max_timeout_assign_ms, max_timeout_start_ms=self.max_timeout_start_ms,
            max_timeout_run_ms=None if persistent else self.max_timeout_run_ms + RUN_GRACE_MS,
            max_retry_count=self.max_retry_count, max_node_count=self.max_node_count,
        )  # fmt: skip
        if persistent:
            name = PERSISTENT_NAME.format(image=docker.image[:56], suffix=secrets.token_hex(3))
            served = {"name": name, "server": {"plugin": docker.image}, "env": docker.env, "limits": limits}
            return JobCreate(type="mcp_host", input=served, resources=resources)
        return JobCreate(type="plugin_exec", input={"plugin": docker.image, "env": docker.env,
                                                    "limits": {"wall_seconds": self.max_timeout_run_ms / 1000,
                                                               **limits}}, resources=resources)  # fmt: skip

    def record(self, image_digest: str, image_size_bytes: int | None) -> dict[str, Any]:
        """What the job index keeps to answer in this API's shape (JobRow.submitted_request): the body, its secrets
        hidden, and the image the plugin ran."""
        return {"body": hide_secrets(self.model_dump(mode="json")), "image_digest": image_digest,
                "image_size_bytes": image_size_bytes}  # fmt: skip


def hide_secrets(value: Any, field: str | None = None) -> Any:
    """The JSON value with every non-empty value of a secret field (SECRET_FIELDS) at any depth as HIDDEN; `field` is
    the name the value itself has, when it is one field's."""
    if field in SECRET_FIELDS and value:
        return HIDDEN
    if isinstance(value, dict):
        return {key: hide_secrets(item, key) for key, item in value.items()}
    if isinstance(value, list):
        return [hide_secrets(item) for item in value]
    return value


def tag_names(tag: str | None, image_digest: str) -> bool:
    """Whether a request's `tag` names a plugin's image: absent, 'latest', or its digest or 12+ hex digits of it."""
    if tag is None or tag == "latest":
        return True
    match = HEX_PREFIX.fullmatch(tag)
    return match is not None and image_digest.removeprefix("sha256:").startswith(match.group(2))


class ComputeStatus(str, Enum):
    PENDING = "PENDING"
    ASSIGNED = "ASSIGNED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"


# every kiln status as the GPU job API says it; ASSIGNED is a flow run waiting for a worker, a merge still runs
STATUS_OF = {
    JobStatus.PENDING: ComputeStatus.PENDING,
    JobStatus.QUEUED: ComputeStatus.ASSIGNED,
    JobStatus.RUNNING: ComputeStatus.RUNNING,
    JobStatus.MERGING: ComputeStatus.RUNNING,
    JobStatus.COMPLETED: ComputeStatus.COMPLETED,
    JobStatus.CACHE_HIT: ComputeStatus.COMPLETED,
    JobStatus.FAILED: ComputeStatus.FAILED,
    JobStatus.CANCELLED: ComputeStatus.CANCELLED,
}


# the request's fields a job echoes as given (`parameters` with its secrets hidden)
ECHOED = ("task", "title", "description", "cpu_count", "gpu_count", "gpu_name", "gpu_registry_uuid", "min_ram_gb",
          "min_vram_gb", "min_storage_gb", "max_timeout_assign_ms", "max_timeout_run_ms", "max_timeout_start_ms",
          "max_retry_count", "max_node_count", "parameters")  # fmt: skip


class ComputeJob(BaseModel):
    """A job in the GPU job API's shape: kiln's plugin_exec (BATCH) or mcp_host (PERSISTENT) job with the request
    it came from."""

    object: Literal["job"] = Field("job", description="What this object is: always 'job'.")
    uuid: str = Field(description="The kiln job's id: GET /api/v1/jobs/{uuid} shows it as kiln has it.")
    status: ComputeStatus = Field(
        description="PENDING (waiting in kiln's index), ASSIGNED (released to Prefect, waiting for a worker), "
        "RUNNING, COMPLETED, CANCELLED or FAILED."
    )
    status_reason: str | None = Field(
        None, description="Why the job waits or did not complete, e.g. 'exited with code 3: <stderr's end>'."
    )
    created_at: datetime | None = Field(description="When it was submitted (ISO 8601, UTC).")
    updated_at: datetime | None = Field(description="When its status last changed (ISO 8601, UTC).")
    started_at: datetime | None = Field(None, description="When it started running (ISO 8601, UTC).")
    completed_at: datetime | None = Field(None, description="When it ended (ISO 8601, UTC).")
    timeout_assign_at_ms: int | None = Field(
        description="When it fails if no worker has picked it up, in ms since the epoch: created_at + "
        "max_timeout_assign_ms."
    )
    task: Literal["BATCH", "PERSISTENT"] = Field(description="The job's task, as given.")
    title: str = Field(description="The job's title, as given.")
    description: str | None = Field(None, description="The job's description, as given.")
    cpu_count: int | None = Field(description="CPU cores asked for.")
    gpu_count: int | None = Field(description="GPUs asked for.")
    gpu_name: str | None = Field(None, description="The GPU model asked for.")
    gpu_registry_uuid: str | None = Field(None, description="Always null: kiln has no GPU registry.")
    min_ram_gb: float = Field(description="Memory in GB asked for.")
    min_vram_gb: float = Field(description="GPU memory in GB asked for.")
    min_storage_gb: float = Field(description="Free disk in GB asked for.")
    max_timeout_assign_ms: int | None = Field(None, description="As given.")
    max_timeout_run_ms: int | None = Field(None, description="As given.")
    max_timeout_start_ms: int | None = Field(None, description="As given.")
    max_retry_count: int | None = Field(None, description="As given.")
    max_node_count: int | None = Field(None, description="As given.")
    parameters: ContainerParameters = Field(
        description=f"The container's parameters as given, every non-empty secret or sshkey as {HIDDEN!r}."
    )
    image_size_bytes: int | None = Field(
        None, description="The plugin's image as a registry counts it (config and layers); null when the API cannot "
        "read the image store."
    )
    container_access_tokens: list[dict[str, Any]] = Field(
        default_factory=list, description="BATCH: always empty, nothing can reach a container in kiln's sandbox. "
        "PERSISTENT: one entry, {'type': 'mcp', 'name': …, 'url': …}, the container's MCP endpoint (streamable HTTP) "
        "on the kiln API, reached with the kiln key as bearer; nothing secret is in it.",
    )
    source_recipe_uuid: str | None = Field(None, description="Always null: kiln has no recipes.")

    @field_serializer("created_at", "updated_at", "started_at", "completed_at")
    def _iso(self, value: datetime | None) -> str | None:
        return iso(value)

    @classmethod
    def of(cls, job: Job, submitted_request: dict[str, Any], api_url: str = "") -> ComputeJob:
        """The kiln job `job` answered in this API's shape, with the request kiln kept for it (record()); a
        PERSISTENT job's MCP endpoint under `api_url`."""
        body = submitted_request["body"]
        assign_ms = body["max_timeout_assign_ms"]
        tokens = []
        if job.type == "mcp_host":
            name = job.input["name"]
            tokens = [{"type": "mcp", "name": name, "url": f"{api_url.rstrip('/')}/api/v1/mcp/{name}/mcp"}]
        return cls(
            container_access_tokens=tokens,
            uuid=job.id, status=STATUS_OF[job.status], status_reason=job.status_reason, created_at=job.created_at,
            updated_at=max(t for t in (job.created_at, job.queued_at, job.started_at, job.completed_at) if t),
            started_at=job.started_at, completed_at=job.completed_at,
            timeout_assign_at_ms=round(job.created_at.timestamp() * 1000) + assign_ms if assign_ms else None,
            image_size_bytes=submitted_request.get("image_size_bytes"),
            **{name: body[name] for name in ECHOED},
        )  # fmt: skip


class ComputeJobPage(BaseModel):
    jobs: list[ComputeJob] = Field(
        description="The project's jobs submitted through /api/v1/compute/jobs, newest first."
    )
    next_cursor: int | None = Field(None, description="Pass as `cursor` for the next page; null on the last.")
