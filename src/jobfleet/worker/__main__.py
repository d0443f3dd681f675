"""`python -m jobfleet.worker JSON`: the lean entry `jobfleet run` starts its workers with.

It skips the command line's imports so a worker is taking jobs a few tens of milliseconds
after it is spawned. People start workers with `jobfleet worker`, which takes flags.
"""

from __future__ import annotations

import json
import logging
import sys

from jobfleet.blobs import Blobs
from jobfleet.store import open_store
from jobfleet.worker.loop import Worker, WorkerOptions


def main(argv: list[str]) -> int:
    conf = json.loads(argv[0])
    logging.basicConfig(level=logging.WARNING, format="jobfleet worker: %(message)s")
    store = open_store(conf["store"])
    try:
        Worker(store, Blobs(conf["blobs"]), WorkerOptions(**conf["options"])).run()
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
