"""dataset_process's library: reading and writing datasets of structures, and the pipeline's steps; no Prefect here."""
