"""Job files and job specs: read, template and validate jobs before anything is stored."""

from jobfleet.spec.model import JobSpec, make_job, parse_duration, parse_size
from jobfleet.spec.readers import each_jobs, iter_jobs, read_jobs
from jobfleet.spec.template import compile_template, render

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
