"""Job files and job specs: read, template and validate jobs before anything is stored."""

from __future__ import annotations

from typing import Any

from jobfleet.spec.model import JobSpec, make_job, parse_duration, parse_size

__all__ = [
    "JobSpec",
    "compile_template",
    "each_jobs",
    "iter_jobs",
    "make_job",
    "parse_duration",
    "parse_size",
    "read_jobs",
    "render",
]

_LAZY = {
    "each_jobs": "readers", "iter_jobs": "readers", "read_jobs": "readers",
    "compile_template": "template", "render": "template",
}


def __getattr__(name: str) -> Any:
    """The readers (and YAML) load on first use: a worker needs only JobSpec."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"jobfleet.spec.{_LAZY[name]}"), name)
    raise AttributeError(name)
