"""The one way kiln declares an executor: a Prefect task whose result stays in memory."""

from __future__ import annotations

from functools import partial

from prefect import task
from prefect.cache_policies import NO_CACHE

# A job's answer is its flow's result, which the relay reads back; a step's result only feeds the
# next step in the same process. Persisting each would write a file per step (a 1000-structure
# relax job would write 1000), and a cache key would hash every input (a loaded model, a thousand
# structures) at every call. Steps are deterministic: a retry is the job's own (max_retry_count).
executor = partial(task, persist_result=False, cache_policy=NO_CACHE)
