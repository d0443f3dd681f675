"""`Executor`: concurrent.futures on jobfleet; `submit_map`: a detached run of calls."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor as _Executor
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from jobfleet.api import wire
from jobfleet.api.handle import OVERLAP, POLL_FAST, Run, connect, next_poll, start_worker, value_of
from jobfleet.blobs import Blobs
from jobfleet.spec.model import JobSpec, parse_duration, parse_size
from jobfleet.store import NewRun, Store


@dataclass(frozen=True)
class CallOptions:
    """Per-call options: resources, limits, attempts and a name shown by the CLI."""

    cpus: float = 1.0
    memory: int = 0  # bytes
    timeout: float | None = None  # seconds
    max_attempts: int = 1  # a Python exception is not retried; a lost worker is, when > 1
    name: str | None = None

    def but(self, **changes: Any) -> CallOptions:
        """These options with `changes`; memory and timeout may be written as in job files
        ("2GB", "5m")."""
        try:
            if "memory" in changes:
                changes["memory"] = parse_size(changes["memory"])
            if changes.get("timeout") is not None:
                changes["timeout"] = parse_duration(changes["timeout"])
        except ValueError as e:
            raise ValueError(f"jobfleet call options: {e}") from None
        opts = replace(self, **changes)
        if opts.max_attempts < 1:
            raise ValueError("jobfleet call options: max_attempts must be at least 1")
        return opts


def _spec(fn: Callable[..., Any], opts: CallOptions, what: str = "...") -> JobSpec:
    label = getattr(fn, "__qualname__", None) or type(fn).__name__
    return JobSpec(command=f"python: {label}({what})", name=opts.name, cpus=opts.cpus,
                   memory=opts.memory, timeout=opts.timeout, max_attempts=opts.max_attempts)


class _Calls:
    """Pickles calls of one function: the function once into the blob store, then arguments."""

    def __init__(self, blobs: Blobs) -> None:
        self.blobs = blobs
        self._digests: dict[int, tuple[Callable[..., Any], str]] = {}
        self._n = 0

    def payload(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                run_id: str) -> bytes:
        known = self._digests.get(id(fn))
        if known is None or known[0] is not fn:
            known = (fn, wire.store_function(self.blobs, fn))
            self._digests[id(fn)] = known
        self._n += 1
        call = wire.envelope(self.blobs, wire.dumps((args, kwargs)),
                             f"payloads/{run_id}/{self._n}.pkl")
        return known[1].encode() + b"\n" + call


#: how long shutdown() waits for an unused worker to exit after SIGTERM before killing it, s
_STOP_WAIT = 10.0
#: a local worker that exited is started again no sooner than this after the last start, s
_RESTART_AFTER = 1.0


#: runs stored before the chunk function moved to `wire` name it here
_apply_chunk = wire.apply_chunk


def _local_slots(workers: int | None) -> int:
    return (os.cpu_count() or 1) if workers is None else workers


def _new_run(db: Store, run_id: str, name: str | None, jobs: list[JobSpec],
             payloads: Iterable[bytes]) -> None:
    db.submit(NewRun(name=name, source="python", workdir=os.getcwd(), id=run_id), jobs, payloads)


class Executor(_Executor):
    """Run Python calls as jobfleet jobs: durable, logged, on local workers or a fleet.

    `workers`: slots of the local worker started for this executor (default: CPU count);
    0 starts none (workers elsewhere serve the store). `store`/`blobs`: as for the CLI.

    The local worker starts here, not at the first call: it imports and connects while the
    caller builds its calls, serving a run id chosen now (`run_id` shows it once the run is
    stored). Unused, it exits when idle or at `shutdown()`.
    """

    def __init__(self, workers: int | None = None, *, store: str | None = None,
                 blobs: str | None = None, name: str | None = None, **options: Any) -> None:
        self._store, self._blobs = connect(store, blobs)
        self._workers = _local_slots(workers)
        self._name = name
        self._defaults = CallOptions().but(**options)
        self._calls = _Calls(self._blobs)
        self._run_id = os.urandom(4).hex()  # chosen now, so the worker can wait for it
        self.run_id: str | None = None  # set once the run is stored
        self._lock = threading.Condition()
        self._queue: list[tuple[JobSpec, Callable[..., Any], tuple[Any, ...], dict[str, Any],
                                Future[Any]]] = []
        self._futures: dict[int, Future[Any]] = {}  # by seq, until done
        self._cancels: list[int] = []
        self._shutdown = False
        self._worker: subprocess.Popen[bytes] | None = None
        self._worker_since = 0.0  # monotonic: when it was started
        self._thread: threading.Thread | None = None
        if self._workers:
            self._start_worker()

    # -- concurrent.futures -----------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._submit(_spec(fn, self._defaults), fn, args, kwargs)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        return self._map(fn, iterables, timeout, chunksize, self._defaults)

    def wait_for_workers(self, timeout: float | None = 60.0) -> None:
        """Block until this executor's local worker has started and taken its place in the
        store (as `ray.init()` or Dask's `Client.wait_for_workers()` wait for theirs), so the
        first calls start at once. Returns at once with `workers=0`. Raises TimeoutError, or
        RuntimeError when the worker exited (its log is in .jobfleet/workers/ or the blob
        store's workers/ folder)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                worker = self._worker
            if worker is None:
                return
            if any(w.pid == worker.pid and w.run_id == self._run_id and w.state == "running"
                   for w in self._store.workers()):
                return
            if worker.poll() is not None:
                raise RuntimeError(f"the executor's worker exited with status {worker.returncode}"
                                   " before it started; its log says why (workers/ beside the"
                                   " blob store, or .jobfleet/workers/)")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the executor's worker did not start within {timeout:g}s")
            time.sleep(0.01)

    def options(self, **options: Any) -> _Bound:
        """This executor with other per-call options (cpus, memory, timeout, max_attempts, name)."""
        return _Bound(self, self._defaults.but(**options))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                for _, _, _, _, f in self._queue:
                    f.cancel()
                self._queue.clear()
                for f in list(self._futures.values()):
                    f.cancel()
            self._lock.notify_all()
        if wait and self._thread is not None:
            self._thread.join()
        self._stop_unused_worker(wait)

    def _stop_unused_worker(self, wait: bool) -> None:
        """Stop the worker started for a run that will never be stored: nothing was submitted
        (or what was, was cancelled before it was stored). One serving a stored run is left
        to finish and exit when idle, as a detached run's is."""
        with self._lock:
            storing = self._thread is not None and self._thread.is_alive()
            worker = self._worker
            if self.run_id is not None or storing or worker is None or worker.poll() is not None:
                return
        worker.terminate()  # SIGTERM: an idle worker exits at once
        if wait:
            try:
                worker.wait(_STOP_WAIT)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()

    # -- the work -----------------------------------------------------------------------------
    def _submit(self, spec: JobSpec, fn: Callable[..., Any], args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
            self._queue.append((spec, fn, args, kwargs, future))
            self._start_thread()
            self._lock.notify_all()
        return future

    def _map(self, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...],
             timeout: float | None, chunksize: int, opts: CallOptions) -> Iterator[Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        items = list(zip(*iterables, strict=False))
        if chunksize > 1:
            chunks = [items[i:i + chunksize] for i in range(0, len(items), chunksize)]
            futures = [self._submit(_spec(fn, opts, f"{len(c)} items"), wire.apply_chunk, (fn, c), {})
                       for c in chunks]
        else:
            spec = _spec(fn, opts)
            futures = [self._submit(spec, fn, args, {}) for args in items]

        def results() -> Iterator[Any]:
            try:
                for f in futures:
                    left = None if deadline is None else deadline - time.monotonic()
                    value = f.result(left)
                    if chunksize > 1:
                        yield from value
                    else:
                        yield value
            finally:
                for f in futures:
                    f.cancel()
        return results()

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="jobfleet-executor", daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        """Store what was submitted, start a worker, and resolve futures as jobs end."""
        since, delay = 0.0, POLL_FAST
        try:
            while True:
                with self._lock:
                    batch, self._queue = self._queue, []
                    cancels, self._cancels = self._cancels, []
                    if not batch and not self._futures and self._shutdown:
                        return
                if batch:
                    self._store_batch(batch)
                for seq in cancels:  # futures exist only for stored jobs: run_id is set
                    job = self._store.job(f"{self.run_id}-{seq}")
                    self._store.cancel(job.run_id, job.key)
                found = self._collect(since)
                since = max(since, found - OVERLAP)
                if self._futures:
                    self._keep_worker()
                delay = next_poll(delay, bool(found))
                with self._lock:
                    if not self._queue and not self._cancels:
                        self._lock.wait(delay)
        except BaseException as e:  # noqa: BLE001  (every waiting future gets the error)
            with self._lock:
                for f in self._futures.values():
                    if not f.done():
                        f.set_exception(e)
                for _, _, _, _, f in self._queue:
                    f.set_exception(e)
                self._futures.clear()
                self._queue.clear()

    def _store_batch(self, batch: list[Any]) -> None:
        jobs = [spec for spec, *_ in batch]
        run_id = self._run_id
        payloads = [self._calls.payload(fn, args, kwargs, run_id) for _, fn, args, kwargs, _ in batch]
        if self.run_id is None:
            _new_run(self._store, run_id, self._name, jobs, payloads)
            self.run_id, first = run_id, 1
        else:
            first = self._store.append(run_id, jobs, payloads)
        with self._lock:
            for seq, (*_, future) in enumerate(batch, first):
                self._futures[seq] = future
                future.add_done_callback(lambda f, seq=seq: self._on_done(f, seq))
        self._keep_worker()

    def _start_worker(self) -> None:
        self._worker = start_worker(self._store, self._blobs, self._run_id, self._workers)
        self._worker_since = time.monotonic()

    def _keep_worker(self) -> None:
        """Start the local worker again when it has exited while calls wait: it stops after
        IDLE_EXIT without work, and may have been on its way out as new calls were stored.
        At most once a second, should it fail at start."""
        worker = self._worker
        if (self._workers and worker is not None and worker.poll() is not None
                and time.monotonic() - self._worker_since >= _RESTART_AFTER):
            self._start_worker()

    def _on_done(self, future: Future[Any], seq: int) -> None:
        if future.cancelled():
            with self._lock:
                if seq in self._futures:
                    self._cancels.append(seq)
                    del self._futures[seq]

    def _collect(self, since: float) -> float:
        """Resolve the futures of jobs that ended; returns the latest end seen (0 if none)."""
        if self.run_id is None or not self._futures:
            return 0.0
        latest = 0.0
        for e in self._store.ended(self.run_id, since):
            with self._lock:
                future = self._futures.pop(e.seq, None)
            if future is None:
                continue
            latest = max(latest, e.finished_at)
            ok, value = value_of(self._blobs, f"{self.run_id}-{e.seq}", e)
            if not future.set_running_or_notify_cancel():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        return latest


class _Bound:
    """An executor with other per-call options; submit and map as on the executor."""

    def __init__(self, executor: Executor, opts: CallOptions) -> None:
        self._executor, self._opts = executor, opts

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._executor._submit(_spec(fn, self._opts), fn, args, kwargs)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        return self._executor._map(fn, iterables, timeout, chunksize, self._opts)


def submit_map(fn: Callable[..., Any], items: Iterable[Any], *, name: str | None = None,
               store: str | None = None, blobs: str | None = None, workers: int | None = None,
               **options: Any) -> Run:
    """Store one call of `fn` per item as a new run, start local workers, and return at once.

    The workers run in the background and exit when idle; `jobfleet.attach(run.id)` from any
    process returns the same run.
    """
    db, blob_store = connect(store, blobs)
    opts = CallOptions().but(**options)
    calls = _Calls(blob_store)
    run_id = os.urandom(4).hex()
    values = list(items)
    payloads = (calls.payload(fn, (v,), {}, run_id) for v in values)
    _new_run(db, run_id, name, [_spec(fn, opts)] * len(values), payloads)
    slots = _local_slots(workers)
    if slots:
        start_worker(db, blob_store, run_id, slots)
    return Run(run_id, db, blob_store)


