"""The Dask and Celery runs of the calls benchmark: one run each, inside `calls.py _child`.

They run with an interpreter that has the peer installed (its own venv, see peers.py), so this
module imports nothing from jobfleet and imports each peer only inside its function. Like the
other children, each starts its peer's workers before the timer and returns the timings, the
results (checked by the caller) and the peer's version.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: how long Celery's worker gets to answer a ping before the run fails
CELERY_READY_WITHIN = 60.0


def _chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def child_dask(inc: Callable[[int], int], inc_chunk: Callable[[list[int]], list[int]], n: int,
               workers: int, chunksize: int) -> dict[str, Any]:
    """A local Dask cluster of `workers` processes (one thread each); `client.map` + `gather`.
    Dask has no chunksize: with one, each task is a chunk."""
    import distributed
    from distributed import Client, LocalCluster

    imported = time.time()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)
    ready = time.time()
    t0 = time.perf_counter()
    if chunksize == 1:
        results = client.gather(client.map(inc, range(n)))
    else:
        parts = client.gather(client.map(inc_chunk, _chunks(n, chunksize)))
        results = [y for ys in parts for y in ys]
    seconds = time.perf_counter() - t0
    mapped = time.time()
    client.close()
    cluster.close()
    return {"version": distributed.__version__, "imported": imported, "ready": ready,
            "mapped": mapped, "map_seconds": seconds, "shutdown_seconds": time.time() - mapped,
            "results": results}


@contextlib.contextmanager
def _celery_worker(workers: int, queue: str) -> Iterator[subprocess.Popen[bytes]]:
    """`celery worker` (prefork, `workers` processes) on its own queue; stopped on the way out."""
    argv = [sys.executable, "-m", "celery", "-A", "celeryapp", "worker", "--pool", "prefork",
            "--concurrency", str(workers), "--queues", queue, "--hostname", f"{queue}@%h",
            "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
            "--without-heartbeat"]
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    proc = subprocess.Popen(argv, cwd=HERE, env=env, stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()  # a warm shutdown: the pool's processes exit with it
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def child_celery(inc: Callable[[int], int], inc_chunk: Callable[[list[int]], list[int]], n: int,
                 workers: int, chunksize: int) -> dict[str, Any]:
    """Celery with Redis as broker and result backend (env JOBFLEET_BENCH_REDIS), a prefork
    worker of `workers` processes on a queue of this run's own; a group of `inc` tasks, or
    with a chunksize Celery's own `chunks`. `inc` here is the task celeryapp.py defines."""
    import celery
    from celery import group

    sys.path.insert(0, str(HERE))
    import celeryapp

    imported = time.time()
    queue = f"jobfleet-bench-{uuid.uuid4().hex[:12]}"
    with _celery_worker(workers, queue) as proc:
        deadline = time.monotonic() + CELERY_READY_WITHIN
        while not celeryapp.app.control.ping(destination=[f"{queue}@{os.uname().nodename}"],
                                             timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"celery: the worker did not answer within "
                                 f"{CELERY_READY_WITHIN:.0f}s (exit status {proc.poll()})")
        ready = time.time()
        t0 = time.perf_counter()
        if chunksize == 1:
            sent = group(celeryapp.inc.s(i) for i in range(n)).apply_async(queue=queue)
            results = sent.get()
        else:
            sent = celeryapp.inc.chunks(((i,) for i in range(n)), chunksize).group() \
                .apply_async(queue=queue)
            results = [y for ys in sent.get() for y in ys]
        seconds = time.perf_counter() - t0
        mapped = time.time()
        sent.forget()  # the results leave Redis now, not when they expire
    # the queue's bindings, which Redis would keep
    with contextlib.suppress(Exception), celeryapp.app.connection_for_write() as conn:
        conn.default_channel.client.delete(f"_kombu.binding.{queue}",
                                           f"_kombu.binding_permanent.{queue}")
    return {"version": celery.__version__, "imported": imported, "ready": ready,
            "mapped": mapped, "map_seconds": seconds, "shutdown_seconds": time.time() - mapped,
            "results": results}
