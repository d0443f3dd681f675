"""jobfleet: run many jobs on a fleet of workers, starting with this machine."""

from jobfleet.errors import JobfleetError, SpecError

__version__ = "0.1.0"
__all__ = ["JobfleetError", "SpecError", "__version__"]
