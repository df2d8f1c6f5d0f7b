"""Executors of hpc_submit jobs: running tasks on dask-jobqueue clusters, and the callables they run."""
