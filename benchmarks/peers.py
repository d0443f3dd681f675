"""The peers run.py compares jobfleet with: found here, or installed on request, or skipped
with the reason.

Commands: GNU parallel (a Debian package) and xargs. Functions: ProcessPoolExecutor (this
Python), and Dask distributed, Ray and Celery, each in a venv of its own under /tmp
(`/tmp/daskenv`, `/tmp/rayenv`, `/tmp/celeryenv`) so that jobfleet's environment stays as it
is; Celery also needs a Redis server (JOBFLEET_BENCH_REDIS, else 127.0.0.1:6379, else a
private `redis-server` started for the run).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import calls
import overhead

#: where the Python peers' venvs live: <VENVS>/<name>env
VENVS = Path(os.environ.get("JOBFLEET_BENCH_VENVS", "/tmp"))
#: per Python peer: what `pip install` gets, and the code that prints its version
PYTHON_PEERS: dict[str, tuple[list[str], str]] = {
    "dask": (["distributed"], "import distributed; print(distributed.__version__)"),
    "ray": (["ray"], "import ray; print(ray.__version__)"),
    "celery": (["celery[redis]"], "import celery, redis; print(celery.__version__)"),
}
DEFAULT_REDIS = "redis://127.0.0.1:6379/15"
TAIL = 3000


def _tail(p: subprocess.CompletedProcess[str]) -> str:
    return (p.stdout + p.stderr)[-TAIL:]


# -- commands -------------------------------------------------------------------------------------


def apt_install(*packages: str) -> str | None:
    """`apt-get install` the packages (root only); None when done, else why not."""
    if shutil.which("apt-get") is None:
        return "no apt-get here"
    if os.geteuid() != 0:
        return "not root: apt-get install needs root (sudo apt-get install " + " ".join(packages) + ")"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        print(f"installing: {' '.join(argv)}", flush=True)
        p = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            return f"{' '.join(argv)} exited with status {p.returncode}: {_tail(p)}"
    return None


def find_parallel(install: bool) -> overhead.Tool:
    tool = overhead.find_parallel(require=False)
    if tool.exe is None and install and shutil.which("parallel") is None:
        why = apt_install("parallel")
        tool = overhead.find_parallel(require=False)
        if why:
            tool.skip_reason = f"{tool.skip_reason}; --install failed: {why}"
    return tool


# -- Python peers ---------------------------------------------------------------------------------


def venv_python(name: str) -> Path:
    return VENVS / f"{name}env" / "bin" / "python"


def peer_version(python: str, name: str) -> tuple[str | None, str]:
    """(version, "") when `python` can import the peer, else (None, why not)."""
    code = PYTHON_PEERS[name][1]
    try:
        p = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=180,
                           stdin=subprocess.DEVNULL, env=calls.env_for(name))
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines()
        return None, lines[-1] if lines else f"exit status {p.returncode}"
    return p.stdout.strip().splitlines()[-1], ""


def pip_install(name: str) -> str | None:
    """A venv at <VENVS>/<name>env with the peer pip-installed; None when done, else why not."""
    python = venv_python(name)
    packages = PYTHON_PEERS[name][0]
    print(f"installing {name}: pip install {' '.join(packages)} into {python.parent.parent}",
          flush=True)
    steps = [] if python.exists() else [[sys.executable, "-m", "venv", str(python.parent.parent)]]
    steps.append([str(python), "-m", "pip", "install", "--quiet", *packages])
    for argv in steps:
        p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            return f"{' '.join(argv)} exited with status {p.returncode}: {_tail(p)}"
    return None


def find_python_peer(name: str, install: bool, given: str | None = None) -> calls.Tool:
    """The peer's interpreter: `given`, else this Python, else its venv (installed with
    `install` when none can import it); a skipped Tool with the reason otherwise."""
    if given:
        version, why = peer_version(given, name)
        if version is None:
            return calls.Tool(name, None, f"{given} cannot import {name}: {why}")
        return calls.Tool(name, given, version=version)
    candidates = [sys.executable, str(venv_python(name))]
    if name == "ray":
        candidates += [str(p) for p in calls.RAY_PYTHONS]
    tried = []
    for python in dict.fromkeys(candidates):
        version, why = peer_version(python, name) if Path(python).exists() else (None, "not found")
        if version is not None:
            return calls.Tool(name, python, version=version)
        tried.append(f"{python} ({why})")
    if install:
        failed = pip_install(name)
        version, why = peer_version(str(venv_python(name)), name)
        if version is not None:
            return calls.Tool(name, str(venv_python(name)), version=version,
                              details={"installed": True})
        return calls.Tool(name, None, f"--install: {failed or why}")
    return calls.Tool(name, None, f"no interpreter here can import {name}; tried "
                      + ", ".join(tried) + "; run with --install")


# -- Redis, for Celery -----------------------------------------------------------------------------


def redis_info(url: str) -> tuple[str | None, str]:
    """(server version, "") when a Redis server answers at `url`, else (None, why not)."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379),
                                      timeout=3) as s:
            s.sendall(b"INFO server\r\n")
            data = b""
            while b"\r\n" not in data or len(data) < _bulk_length(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        return None, f"no Redis server at {parts.hostname}:{parts.port or 6379}: {e}"
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith("redis_version:"):
            return line.split(":", 1)[1].strip(), ""
    return None, f"{url} did not answer INFO like Redis: {data[:100]!r}"


def _bulk_length(data: bytes) -> int:
    """How many bytes the bulk reply that starts `data` takes in all (header included)."""
    head, _, _ = data.partition(b"\r\n")
    if not head.startswith(b"$"):
        return len(data)
    return len(head) + 2 + int(head[1:]) + 2


@contextlib.contextmanager
def redis_server(url: str | None, install: bool) -> Iterator[dict[str, Any]]:
    """A Redis for Celery: the one at `url` (or 127.0.0.1:6379), else a private `redis-server`
    on a free port, stopped on the way out. Yields {"url", "version"} or {"skipped": why}."""
    url = url or DEFAULT_REDIS
    version, why = redis_info(url)
    if version:
        yield {"url": url, "version": version, "started": False}
        return
    exe = shutil.which("redis-server")
    if exe is None and install:
        failed = apt_install("redis-server")
        exe = shutil.which("redis-server")
        why += f"; --install: {failed}" if failed else ""
    if exe is None:
        yield {"skipped": f"{why}, and no redis-server here to start one"
                          + ("" if install else " (--install gets it)")}
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="jobfleet-bench-redis-")
    proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", folder], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    private = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while (version := redis_info(private)[0]) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if version is None:
            yield {"skipped": f"{why}; a private redis-server on port {port} did not start"}
        else:
            yield {"url": private, "version": version, "started": True}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
