"""jobfleet: run many jobs on a fleet of workers, starting with this machine."""

from typing import Any

from jobfleet.errors import JobfleetError, SpecError

__version__ = "0.1.0"
#: the Python API (jobfleet.api), imported on first use so that the CLI starts without it
_API = ("CallFailed", "CallOptions", "Executor", "RemoteError", "Run", "StillRunning", "attach",
        "runs", "submit_map")
__all__ = ["JobfleetError", "SpecError", "__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from jobfleet import api

        return getattr(api, name)
    raise AttributeError(f"module 'jobfleet' has no attribute {name!r}")
