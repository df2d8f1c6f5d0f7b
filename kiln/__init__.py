"""kiln: a unified compute-job platform for materials science, built on Prefect 3."""
