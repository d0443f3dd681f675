"""What every benchmark script shares: its error, the machine it ran on, a clean environment,
and the ending (check the target ratio, write the JSON report, choose the exit status)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

SUBJECT = "jobfleet"


class BenchmarkError(Exception):
    """A tool failed, or its result cannot be trusted; the benchmark stops."""


def clean_env() -> dict[str, str]:
    """This environment without JOBFLEET_* settings, which would change what is measured."""
    return {k: v for k, v in os.environ.items() if not k.startswith("JOBFLEET_")}


def machine() -> dict[str, Any]:
    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024  # kB
                break
    return {
        "cpu_count": os.cpu_count(), "cpu_model": model, "memory_bytes": memory,
        "python": platform.python_version(),
        "kernel": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
        "load_average": os.getloadavg(),
        "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
    }


def ratio_text(peer: str, ratio: float) -> str:
    return f"{peer}/{SUBJECT} = {ratio:.2f}x"


def finish(a: argparse.Namespace, benchmark: Callable[[argparse.Namespace], dict[str, Any]],
           check_ratio: Callable[[dict[str, Any], float], tuple[bool, str]]) -> int:
    """Run `benchmark`, check `a.check_ratio` when given, write `a.json`; the exit status."""
    try:
        report = benchmark(a)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ok = True
    if a.check_ratio is not None:
        ok, why = check_ratio(report, a.check_ratio)
        report["check"] = {"ratio": a.check_ratio, "passed": ok, "why": why}
        print(why, file=sys.stdout if ok else sys.stderr)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults written to {a.json}")
    return 0 if ok else 1
