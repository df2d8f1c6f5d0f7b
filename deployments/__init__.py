"""The work pool, its priority-band queues and the job types' deployments, built from prefect.yaml."""
