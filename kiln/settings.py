"""kiln's settings: one pydantic-settings class read from KILN_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# the model folders that travel in the package (TensorNet-MatPES-PBE with matgl's licence), so ml_predict
# works on a fresh install with nothing copied
SHIPPED_MODELS = Path(__file__).resolve().with_name("models")


class KilnSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    home: Path = Field(
        Path("~/.kiln"),
        description="Directory that holds all of kiln's state: databases, results, logs.",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy async URL of the job index; a SQLite file under KILN_HOME when unset.",
    )
    prefect_database_url: str | None = Field(
        None,
        description="Database of the embedded Prefect server (sqlite+aiosqlite:// or postgresql+asyncpg://); "
        "a SQLite file under KILN_HOME when unset.",
    )
    api_host: str = Field("127.0.0.1", description="Address the kiln API listens on.")
    api_port: int = Field(8000, description="Port the kiln API listens on.")
    prefect_port: int = Field(4200, description="Port of the embedded Prefect server.")
    prefect_api_url: str | None = Field(
        None,
        description="URL of an external Prefect API (http://host:port/api); the embedded server is used when unset.",
    )
    worker_slots: int = Field(2, ge=1, description="Jobs one kiln worker runs at the same time.")
    worker_service_slots: int = Field(
        1, ge=0, description="Persistent jobs (MCP deployments) one kiln worker hosts besides its slots; they never "
        "take a batch slot, so they cannot starve batch work.",
    )
    dask_scheduler_address: str | None = Field(
        None,
        description="tcp:// address of an existing Dask scheduler; a LocalCluster is started when unset.",
    )
    dask_workers: int | None = Field(
        None,
        ge=1,
        description="Processes of the worker's LocalCluster; defaults to its slots plus its service slots.",
    )
    api_key: str | None = Field(
        None, description="API key the CLI sends; read from KILN_HOME/api-key (written by `kiln up`) when unset."
    )
    run_key: SecretStr | None = Field(
        None,
        description="Key the kiln API and workers sign and check run tokens with (a running job's progress goes "
        "straight to the API with one, kiln.run_reports); KILN_HOME/run-key, written on first use, when unset. Set "
        "the same value on the API and on workers that do not share its KILN_HOME.",
    )
    worker_heartbeat_seconds: float = Field(
        2.0, gt=0, description="How often a kiln worker tells the platform it is alive and what it runs."
    )
    worker_lost_seconds: float = Field(
        10.0,
        gt=0,
        description="After this long without a heartbeat a worker is taken as gone and its jobs as crashed.",
    )
    dispatch_interval_seconds: float = Field(
        0.5, gt=0, description="Longest the dispatcher sleeps between passes when nothing wakes it."
    )
    release_ahead: int | None = Field(
        None,
        ge=0,
        description="Batch jobs the dispatcher releases to Prefect beyond the free worker slots. They wait as "
        "Scheduled flow runs, so a worker starts the next job the moment one ends, instead of after kiln has seen "
        "the end (completion event → relay → dispatcher → new flow run → worker). The price is the bound on the "
        "priority order: a job of higher priority submitted later starts after at most this many jobs already "
        "released. Unset: as many as the live workers' batch slots; 0: release only into free slots, in strict "
        "priority order. Persistent jobs are never released ahead of the service slots.",
    )
    reconcile_interval_seconds: float = Field(
        10.0, gt=0, description="How often the relay re-reads unfinished jobs' flow runs from Prefect."
    )
    simulation_cluster: str | None = Field(
        None,
        description="The registered HPC cluster a simulation job without a compute_target goes to when its cost "
        "is above kiln.schemas.simulation.LOCAL_COST_LIMIT; unset, such jobs run locally.",
    )
    batch_max_jobs: int = Field(1000, ge=1, description="Most entries one POST /api/v1/jobs/submit-batch takes.")
    batch_rate_per_minute: int = Field(
        2, ge=1, description="Batch submissions one API key may make per minute; more get a 429 with Retry-After."
    )
    submit_rate_per_minute: int = Field(
        600, ge=1, description="Single job submissions one API key may make per minute; more get a 429."
    )
    upload_max_bytes: int = Field(
        1 << 30,
        ge=1,
        description="Most bytes one POST /api/v1/files takes, its files and their multipart framing together; "
        "a larger upload is refused (413).",
    )
    plugin_image_max_mb: int = Field(
        2048, ge=1, description="Largest plugin image POST /api/v1/plugins takes, in MB; a larger one gets a 413."
    )
    mcp_allowed_origins: list[str] = Field(
        [],
        description="Browser origins (`https://app.example.org`) whose pages may call the MCP URLs "
        "(/api/v1/mcp/{name}/mcp), beside loopback ones; a request with any other Origin header gets a 403 (DNS "
        "rebinding protection, as the MCP specification asks). Requests without an Origin header (MCP clients "
        "that are not browsers) are not affected. As JSON: KILN_MCP_ALLOWED_ORIGINS='[\"https://app.example.org\"]'.",
    )
    public_url: str | None = Field(
        None,
        description="The kiln API's URL as labs and workers reach it: lab_booking callbacks go to "
        "PUBLIC_URL/api/v1/hooks/labs/{lab}, and running jobs' progress to PUBLIC_URL/api/v1/jobs/{id}/progress. The "
        "API's own address (http://API_HOST:API_PORT) when unset.",
    )
    lab_poll_first_seconds: float = Field(
        60.0, gt=0, description="How long after a booked slot ends kiln first asks the lab (GET /bookings/{id}) "
        "for a result no callback brought; each later ask waits twice as long, up to lab_poll_max_seconds.",
    )
    lab_poll_max_seconds: float = Field(
        3600.0, gt=0, description="The longest wait between two asks of a lab for a booking's result.",
    )
    lab_timeout_seconds: float = Field(
        10.0, gt=0, description="Longest kiln waits for a lab to answer one request (slots, book, ask, cancel).",
    )
    model_dir: Path | None = Field(
        None,
        description="Directory of ML model folders (matgl format), searched before the models shipped inside "
        "kiln (kiln/models); KILN_HOME/models when unset. A folder here replaces the shipped one of that name.",
    )

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def job_index_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.home_dir / 'kiln.db'}"

    @property
    def prefect_db_url(self) -> str:
        return self.prefect_database_url or f"sqlite+aiosqlite:///{self.home_dir / 'prefect' / 'prefect.db'}"

    @property
    def prefect_api(self) -> str:
        return self.prefect_api_url or f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def api_url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    @property
    def callback_base_url(self) -> str:
        """Where labs send their callbacks, and runs their progress (kiln.run_reports): the public URL, else the
        API's own."""
        return (self.public_url or self.api_url).rstrip("/")

    @property
    def results_dir(self) -> Path:
        return self.home_dir / "results"

    @property
    def files_dir(self) -> Path:
        """Uploads and job files (kiln.files): under the results, the one directory the API and workers share."""
        return self.results_dir / "files"

    @property
    def plugin_images_dir(self) -> Path:
        """Where plugin images are kept, each in a folder named by its manifest digest."""
        # not KILN_HOME/plugins: that is where labs install their own job types (python packages)
        return self.home_dir / "plugin-images"

    @property
    def sandbox_root(self) -> Path:
        """Where workers run plugins: a locked folder per live worker, a folder per run in it; a worker that starts
        removes what dead ones left (kiln.tasks.plugin.claim_work_dir)."""
        return self.home_dir / "sandbox"

    @property
    def models_path(self) -> tuple[Path, ...]:
        """Where model folders are looked for, first match wins: KILN_MODEL_DIR, then the shipped models."""
        return ((self.model_dir or self.home_dir / "models").expanduser().resolve(), SHIPPED_MODELS)


@lru_cache
def get_settings() -> KilnSettings:
    return KilnSettings()
