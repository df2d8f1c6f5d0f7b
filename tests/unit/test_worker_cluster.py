"""kiln's own Dask cluster keeps its processes: one the scheduler dropped is started again (a real LocalCluster)."""

from __future__ import annotations

import asyncio

import dask
from distributed import LocalCluster

from kiln.worker.worker import mend_local_cluster


async def test_a_process_the_scheduler_dropped_is_started_again():
    # what a loaded machine did: a process missed its heartbeats, the scheduler dropped it, it closed itself, and
    # the cluster forgot it; nothing started it again
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "0.5s"}):
        async with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, asynchronous=True,
                                dashboard_address=None, host="127.0.0.1") as cluster:  # fmt: skip
            assert not mend_local_cluster(cluster, 2)
            dropped = next(iter(cluster.scheduler.workers))
            await cluster.scheduler.remove_worker(dropped, stimulus_id="test-heartbeat-missed", close=True)
            for _ in range(100):
                if len(cluster.workers) < 2:
                    break
                await asyncio.sleep(0.1)
            assert len(cluster.workers) == 1, "the cluster did not forget the dropped process"
            assert mend_local_cluster(cluster, 2)
            # the scheduler knows the new process before the cluster has it among its workers
            for _ in range(600):
                if len(cluster.scheduler.workers) == 2 and len(cluster.workers) == 2:
                    break
                await asyncio.sleep(0.1)
            assert len(cluster.scheduler.workers) == 2 and dropped not in cluster.scheduler.workers
            assert not mend_local_cluster(cluster, 2)
