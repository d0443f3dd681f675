"""The Celery app of the calls benchmark: Redis as broker and result backend, and `inc`.

The worker (`celery -A celeryapp worker`, started by callpeers.py) and the caller both import
it; the Redis URL comes from JOBFLEET_BENCH_REDIS.
"""

from __future__ import annotations

import os

from celery import Celery

REDIS = os.environ.get("JOBFLEET_BENCH_REDIS", "redis://127.0.0.1:6379/15")

app = Celery("jobfleet_bench", broker=REDIS, backend=REDIS)
app.conf.update(
    result_expires=600,  # the results of a benchmark run leave Redis by themselves
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_default_queue="jobfleet-bench",
)


@app.task(name="jobfleet_bench.inc")
def inc(x: int) -> int:
    return x + 1
