"""What starts the worker on an EC2 instance: read the worker's environment (store URL, blob
store) from the fleet's SecureString parameters with the instance profile's credentials, then
become `python -m jobfleet worker ARGS` with it.

    python -m jobfleet.fleet.aws_boot --region R --parameters /jobfleet/FLEET/DIGEST -- ARGS

Nothing secret is on the command line, in the user data or on disk: the values live in SSM
Parameter Store (encrypted with KMS) and in the worker's environment only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

#: the parameters of a fleet live under PREFIX/FLEET/
PREFIX = "/jobfleet"


def parameter_path(fleet: str, env: Mapping[str, str]) -> str:
    """Where the parameters holding `env` go: one path per fleet and environment, so a launch
    with the same store and blobs reuses them and a different one does not overwrite them."""
    digest = hashlib.sha256(json.dumps(sorted(env.items())).encode()).hexdigest()[:16]
    return f"{PREFIX}/{fleet}/{digest}"


def load_env(path: str, ssm: Any) -> dict[str, str]:
    """The variables stored under `path` (one parameter per variable, named after it)."""
    env = {}
    pages = ssm.get_paginator("get_parameters_by_path").paginate(
        Path=path, Recursive=False, WithDecryption=True)
    for page in pages:
        for p in page["Parameters"]:
            env[p["Name"].rsplit("/", 1)[1]] = p["Value"]
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobfleet.fleet.aws_boot")
    parser.add_argument("--region", required=True)
    parser.add_argument("--parameters", required=True, help="the SSM path of the environment")
    parser.add_argument("worker_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    worker_args = args.worker_args[1:] if args.worker_args[:1] == ["--"] else args.worker_args
    try:
        import boto3

        env = load_env(args.parameters, boto3.client("ssm", region_name=args.region))
    except Exception as e:  # noqa: BLE001 - whatever it is, the boot log must say it
        print(f"jobfleet-boot: FAILED: could not read the worker's environment from SSM"
              f" parameters {args.parameters} in {args.region}: {type(e).__name__}: {e}"
              " (does the instance profile's role allow ssm:GetParametersByPath on it?)",
              file=sys.stderr, flush=True)
        return 78
    if not env:
        print(f"jobfleet-boot: FAILED: no parameters under {args.parameters} (removed by a"
              " teardown?)", file=sys.stderr, flush=True)
        return 78
    names = ", ".join(sorted(env))
    print(f"jobfleet-boot: environment read from {args.parameters} ({names});"
          " starting the worker", file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "jobfleet", "worker", *worker_args],
              {**os.environ, **env})


if __name__ == "__main__":
    sys.exit(main())
