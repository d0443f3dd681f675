"""A warm interpreter: runs Python calls one after another for a worker.

Started by the worker with two pipe ends (`--fds IN,OUT`): it reads frames
`(key, digest, function_pickle_or_None, call_pickle)` and answers each with `(key, result)`
(after a first frame, `wire.READY`, once it has imported what it needs),
where result is `wire.ok(...)` or `wire.failure(...)`. Whatever the call prints goes to this
process's stdout/stderr, which the worker copies to the attempt's log. Functions are unpickled
once per interpreter and kept by digest.
"""

from __future__ import annotations

import os
import pickle
import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    fd_in, fd_out = (int(x) for x in args[args.index("--fds") + 1].split(","))
    import cloudpickle  # noqa: F401  (answers are pickled with it: imported before the first call)

    from jobfleet.api import wire

    wire.write_frame(fd_out, wire.READY)  # the worker may wait for this (--warm-calls)
    functions: dict[str, object] = {}
    while True:
        message = wire.read_frame(fd_in)
        if message is None:  # the worker closed the pipe: done
            return 0
        key, digest, body, call = message
        try:
            if body is not None:
                functions[digest] = pickle.loads(body)
            args_, kwargs = pickle.loads(call)
            value = functions[digest](*args_, **kwargs)  # type: ignore[operator]
            result = wire.ok(value)
        except BaseException as e:  # noqa: BLE001  (SystemExit and KeyboardInterrupt too)
            result = wire.failure(e)
        sys.stdout.flush()
        sys.stderr.flush()
        wire.write_frame(fd_out, (key, result))


if __name__ == "__main__":
    os.environ.pop("PYTHONSTARTUP", None)
    sys.exit(main())
