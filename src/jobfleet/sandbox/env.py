"""The environment a job starts with: clean by default, never the worker's secrets.

A worker's own environment holds what a job must not see: cloud keys, database URLs (the
store's, password and all), tokens. A job gets only
- a short allowlist taken from the worker: PATH (with a virtualenv's bin folder, if the
  worker runs in one), LANG, LANGUAGE, LC_*, TERM, TZ, USER, LOGNAME, VIRTUAL_ENV;
- HOME and TMPDIR, both its own fresh workspace;
- the job's own `env` (which wins over the allowlist);
- JOBFLEET_JOB_ID, JOBFLEET_RUN_ID, JOBFLEET_ATTEMPT, and CUDA_VISIBLE_DEVICES when it was
  given GPUs.
With `inherit` (the worker's `--inherit-env`) a job sees the worker's whole environment as
GNU parallel's jobs do, except the worker's own JOBFLEET_* settings.

The allowlist part is encoded once per worker; only the per-attempt variables are added for
each job.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

#: variables passed through from the worker's environment
ALLOWED = frozenset({"PATH", "LANG", "LANGUAGE", "TERM", "TZ", "USER", "LOGNAME", "VIRTUAL_ENV"})
#: ... and Python calls' warm interpreters, which import the user's modules, also get these
ALLOWED_PYTHON = ALLOWED | {"PYTHONPATH"}
#: the PATH of a worker started without one
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def base_env(environ: Mapping[str, str], *, inherit: bool = False,
             allowed: frozenset[str] = ALLOWED) -> dict[bytes, bytes]:
    """The part of every job's environment that comes from the worker's, encoded."""
    if inherit:
        keep = {k: v for k, v in environ.items() if not k.startswith("JOBFLEET_")}
    else:
        keep = {k: v for k, v in environ.items() if k in allowed or k.startswith("LC_")}
    keep.setdefault("PATH", DEFAULT_PATH)
    return {os.fsencode(k): os.fsencode(v) for k, v in keep.items()}


def entries(env: Mapping[bytes, bytes]) -> list[bytes]:
    """`NAME=value` entries, as exec wants them."""
    return [k + b"=" + v for k, v in env.items()]
