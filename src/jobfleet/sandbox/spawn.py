"""Starting a process the fast way: the C library's posix_spawn, called without the GIL.

`os.posix_spawn` holds the GIL while the kernel builds the child (with vfork semantics the
caller waits until the child has exec'd), and it cannot set the child's working directory.
Calling libc through ctypes releases the GIL for the whole call, so a worker can spawn from a
helper thread while its main thread records results, and `addchdir_np` (glibc 2.29, musl
1.1.24) gives the child its directory without touching the worker's own. Where that is
missing, `subprocess` does the same job more slowly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
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
    process's PATH. Returns the pid; raises OSError (FileNotFoundError when `cwd` or the
    program does not exist).
    """
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
        start = libc.posix_spawn if b"/" in argv[0] else libc.posix_spawnp
        err = start(ctypes.byref(pid), argv[0], actions, attr, c_argv, c_env)
    finally:
        libc.posix_spawn_file_actions_destroy(actions)
        libc.posix_spawnattr_destroy(attr)
    if err:
        raise OSError(err, os.strerror(err), cwd.decode(errors="replace"))
    return pid.value


def _spawn_subprocess(argv: Sequence[bytes], env: Sequence[bytes], cwd: bytes, stdout: int) -> int:
    environ = dict(entry.split(b"=", 1) for entry in env)
    proc = subprocess.Popen(list(argv), cwd=cwd, env=environ, stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=stdout, start_new_session=True)
    proc.returncode = 0  # the caller reaps the pid itself; keep Popen from trying too
    return proc.pid
