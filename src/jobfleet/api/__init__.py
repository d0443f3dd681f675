"""The Python API: map functions over items as jobfleet jobs, here or on a fleet.

    with jobfleet.Executor(workers=2) as ex:
        squares = list(ex.map(square, range(10_000)))

    run = jobfleet.submit_map(square, range(1000), name="squares")   # returns at once
    jobfleet.attach(run.id).results()                                 # from anywhere, later

Names are imported on first use: a worker needs only `wire`, not the client's machinery.
"""

from importlib import import_module
from typing import Any

#: where each public name lives
_HOMES = {
    "CallOptions": "executor", "Executor": "executor", "submit_map": "executor",
    "CallFailed": "handle", "Run": "handle", "StillRunning": "handle", "attach": "handle",
    "runs": "handle", "RemoteError": "wire",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'jobfleet.api' has no attribute {name!r}")
    return getattr(import_module(f"jobfleet.api.{home}"), name)
