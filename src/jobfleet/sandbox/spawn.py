"""Starting a process the fast way: the C library's posix_spawn.

A child that runs in this process's own folder (a local run's jobs, by default) is started by
`os.posix_spawn`: it converts its arguments in C and costs the worker about half the CPU time
of the ctypes call below (measured: 75 against 125 microseconds a job), which is a good part
of a short job's overhead. It cannot give the child another folder, so other children go
through libc's posix_spawn called with ctypes, whose `addchdir_np` (glibc 2.29, musl 1.1.24)
sets the child's folder without touching the worker's own. Where that is missing,
`subprocess` does the same job more slowly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import time
from collections.abc import Sequence

#: glibc's and musl's value of POSIX_SPAWN_SETSID
_SETSID = 0x80
_BUFFER = 1024  # bytes, more than posix_spawnattr_t or posix_spawn_file_actions_t need


def _load() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.posix_spawn_file_actions_addchdir_np  # noqa: B018  (raises when missing)
    except (OSError, AttributeError):
        return None
    return libc


_libc = _load()


def spawn(argv: Sequence[bytes], env: Sequence[bytes], cwd: bytes, stdout: int) -> int:
    """Start `argv` in a new session with stdin from /dev/null, stdout and stderr to `stdout`.

    `env` holds `NAME=value` entries. A program named without a `/` is looked up on this
    process's PATH (see _which). Returns the pid; raises OSError (FileNotFoundError when `cwd`
    or the program does not exist).
    """
    program = argv[0] if b"/" in argv[0] else _which(argv[0]) or argv[0]
    if cwd == _own_cwd():
        return _spawn_here(program, argv, env, stdout)
    if _libc is None:
        return _spawn_subprocess(argv, env, cwd, stdout)
    actions = ctypes.create_string_buffer(_BUFFER)
    attr = ctypes.create_string_buffer(_BUFFER)
    libc = _libc
    libc.posix_spawn_file_actions_init(actions)
    libc.posix_spawnattr_init(attr)
    try:
        libc.posix_spawnattr_setflags(attr, ctypes.c_short(_SETSID))
        libc.posix_spawn_file_actions_addopen(actions, 0, os.devnull.encode(), os.O_RDONLY, 0)
        libc.posix_spawn_file_actions_adddup2(actions, stdout, 1)
        libc.posix_spawn_file_actions_adddup2(actions, stdout, 2)
        libc.posix_spawn_file_actions_addchdir_np(actions, cwd)
        c_argv = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
        c_env = (ctypes.c_char_p * (len(env) + 1))(*env, None)
        pid = ctypes.c_int()
        start = libc.posix_spawn if b"/" in program else libc.posix_spawnp
        err = start(ctypes.byref(pid), program, actions, attr, c_argv, c_env)
    finally:
        libc.posix_spawn_file_actions_destroy(actions)
        libc.posix_spawnattr_destroy(attr)
    if err:
        raise OSError(err, os.strerror(err), cwd.decode(errors="replace"))
    return pid.value


def _which(name: bytes) -> bytes | None:
    """Where `name` is on this process's PATH, as execvp would find it; None if nowhere.

    posix_spawnp tries each folder of PATH in turn inside the new child, while the worker
    waits: with a PATH of a dozen folders (a virtualenv, pyenv, cargo, then /usr/bin) that is
    a dozen failed execs, 0.3 ms a job measured here. The answer is kept for _WHICH_FOR
    seconds, so a program put on PATH meanwhile is found as soon as that.
    """
    path = os.environ.get("PATH", os.defpath)
    now = time.monotonic()
    found = _found.get((name, path))
    if found is not None and now < found[1]:
        return found[0]
    program = None
    for folder in path.split(":"):
        candidate = os.path.join(os.fsencode(folder or "."), name)
        if os.access(candidate, os.X_OK) and os.path.isfile(candidate):
            program = candidate
            break
    if len(_found) > 1000:  # many programs, or a PATH that keeps changing
        _found.clear()
    _found[(name, path)] = (program, now + _WHICH_FOR)
    return program


#: what _which found, with until when it holds (monotonic seconds)
_found: dict[tuple[bytes, str], tuple[bytes | None, float]] = {}
_WHICH_FOR = 1.0


def _own_cwd() -> bytes | None:
    try:
        return os.getcwdb()
    except OSError:  # our folder was removed
        return None


def _spawn_here(program: bytes, argv: Sequence[bytes], env: Sequence[bytes], stdout: int
                ) -> int:
    """`spawn` for a child that runs in this process's folder."""
    environ = dict(entry.split(b"=", 1) for entry in env)
    start = os.posix_spawn if b"/" in program else os.posix_spawnp
    return start(program, list(argv), environ, setsid=True, file_actions=(
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, stdout, 1),
        (os.POSIX_SPAWN_DUP2, stdout, 2)))


def _spawn_subprocess(argv: Sequence[bytes], env: Sequence[bytes], cwd: bytes, stdout: int) -> int:
    environ = dict(entry.split(b"=", 1) for entry in env)
    proc = subprocess.Popen(list(argv), cwd=cwd, env=environ, stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=stdout, start_new_session=True)
    proc.returncode = 0  # the caller reaps the pid itself; keep Popen from trying too
    return proc.pid
