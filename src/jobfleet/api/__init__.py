"""The Python API: map functions over items as jobfleet jobs, here or on a fleet.

    with jobfleet.Executor(workers=2) as ex:
        squares = list(ex.map(square, range(10_000)))

    run = jobfleet.submit_map(square, range(1000), name="squares")   # returns at once
    jobfleet.attach(run.id).results()                                 # from anywhere, later
"""

from jobfleet.api.executor import CallOptions, Executor, submit_map
from jobfleet.api.handle import CallFailed, Run, StillRunning, attach, runs
from jobfleet.api.wire import RemoteError

__all__ = ["CallFailed", "CallOptions", "Executor", "RemoteError", "Run", "StillRunning",
           "attach", "runs", "submit_map"]
