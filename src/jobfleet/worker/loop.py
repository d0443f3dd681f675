"""The worker's pull loop: lease jobs that fit, run them, heartbeat, report, drain on SIGTERM."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from jobfleet.api import wire
from jobfleet.blobs import Blobs, LogWriter, log_key
from jobfleet.sandbox import (
    Attempt,
    Child,
    ProcessSandbox,
    Sandbox,
    SandboxError,
    Workspaces,
    sandbox_named,
)
from jobfleet.sandbox.cgroup import Cgroups
from jobfleet.sandbox.env import ALLOWED_PYTHON, base_env, entries
from jobfleet.store import UNSTARTED, Capacity, Lease, Outcome, Store, WorkerInfo
from jobfleet.store.policy import SANDBOX_ERROR, STALLED
from jobfleet.worker.calls import RECYCLE_AFTER, Runner
from jobfleet.worker.limits import Redactor, failure_reason
from jobfleet.worker.outputs import missing_outputs, outputs_done, upload_outputs
from jobfleet.worker.progress import cpu_seconds

log = logging.getLogger("jobfleet.worker")

#: the fastest and slowest the loop polls an empty queue, seconds
_MIN_IDLE_POLL = 0.01
_MAX_IDLE_POLL = 0.5
#: ... when the store wakes the worker as work comes (it polls to reap expired leases)
_MAX_IDLE_POLL_HEARING = 2.0
#: bytes read from a job's output pipe at a time
_CHUNK = 65536
#: how often a busy worker looks for cancel requests between heartbeats, seconds
_CANCEL_CHECK = 1.0
#: a worker started for a run gives up if the run is not stored within this many seconds
_RUN_APPEARS_WITHIN = 60.0
#: jobs that take less than this on average (seconds) are leased ahead and reported in batches
_SHORT_JOB = 0.05
#: how much work (seconds' worth, per slot) a worker of short jobs holds leased ahead, at most
#: this many jobs
_AHEAD_SECONDS = 0.01
_MAX_AHEAD = 100
#: a stalled job's CPU use is looked at this many times per stall_after (at most once a second)
_LOOKS_PER_STALL = 10
#: CPU seconds that count as using the CPU between two looks (below: clock-tick noise)
_CPU_NOISE = 0.02
#: how long a worker with --warm-calls waits for its interpreters before it registers, seconds
_WARM_WITHIN = 10.0
#: how long the outcome of a short job may wait to be reported with others, seconds
_REPORT_WITHIN = 0.01


def _look_every(stall_after: float | None) -> float:
    """How often to look at a job's CPU use, given its stall_after (seconds)."""
    return max(1.0, (stall_after or 0.0) / _LOOKS_PER_STALL)


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How a worker behaves; every field has a CLI flag of the same name."""

    slots: int = os.cpu_count() or 1
    cpus: float | None = None  # None: max(slots, cpu count)
    memory: int | None = None  # bytes; None: this machine's memory
    gpus: int = 0
    lease_seconds: float = 60.0
    idle_exit: float | None = None  # seconds without work before exiting
    max_jobs: int | None = None
    run_id: str | None = None  # serve only this run
    until_done: bool = False  # with run_id: exit once that run has nothing queued or running
    worker_id: str | None = None  # chosen at random when not given
    drain_seconds: float = 30.0  # after SIGTERM, how long running jobs may finish
    kill_grace: float = 5.0  # between TERM and KILL on timeout or cancel
    sandbox: str = "process"  # how attempts run: process, bwrap or container
    allow_sandboxes: tuple[str, ...] = ()  # others a job may ask for with its `sandbox`
    inherit_env: bool = False  # jobs see the worker's environment (not only the allowlist)
    keep_workspaces: bool = False  # leave each attempt's workspace behind, for debugging
    workspaces: str | None = None  # the folder workspaces go in (a temporary one)
    allow_network: bool = True  # may jobs that ask for `network` have it
    gpu_ids: tuple[str, ...] = ()  # the GPUs' device ids; default 0..gpus-1
    warm_calls: bool = False  # start a warm interpreter per slot at once (a run of Python calls)


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def capacity(o: WorkerOptions) -> Capacity:
    """All a worker with these options offers: its slots, CPUs, memory and GPUs."""
    cpus = o.cpus if o.cpus is not None else float(max(o.slots, os.cpu_count() or 1))
    memory = o.memory if o.memory is not None else machine_memory()
    return Capacity(o.slots, cpus, memory, o.gpus)


@dataclass(slots=True)
class _Running:
    lease: Lease
    log: LogWriter
    child: Child | Runner  # a Runner: a Python call in a warm interpreter
    deadline: float | None
    began: float  # wall-clock time it started
    stopping: str | None = None  # why we are killing it: timeout, cancelled, lost, drain
    kill_at: float | None = None
    attempt: Attempt | None = None  # a command's: its sandbox, workspace and limits
    gpus: tuple[str, ...] = ()  # the GPU devices it holds
    quiet_since: float = 0.0  # monotonic: when it last printed or used CPU, as far as seen
    cpu: float = 0.0  # CPU seconds its processes had used when last looked at
    next_look: float = 0.0  # monotonic: when to look at its CPU use again
    stalled: bool = False  # reported stalled (and not moving again since)


@dataclass(slots=True)
class _Timers:
    """When the loop next heartbeats, looks for cancels and polls an empty queue."""

    born: float
    beat_every: float
    max_idle_poll: float = _MAX_IDLE_POLL
    next_lease: float = 0.0
    idle_poll: float = _MIN_IDLE_POLL
    idle_since: float = 0.0
    next_beat: float = 0.0
    next_cancel_check: float = 0.0

    def __post_init__(self) -> None:
        self.idle_since = self.born
        self.next_beat = self.born + self.beat_every
        self.next_cancel_check = self.born + _CANCEL_CHECK

    def leased(self, now: float, got: int) -> None:
        """Poll again at once after a lease that found work; back off while there is none."""
        self.idle_poll = _MIN_IDLE_POLL if got else min(self.max_idle_poll, self.idle_poll * 2)
        self.next_lease = now if got else now + self.idle_poll


@dataclass(slots=True)
class _Stats:
    done: int = 0
    leased: int = 0
    by_status: dict[str, int] = field(default_factory=dict)


class Worker:
    """Runs jobs from a store until told to stop, idle too long, or done `max_jobs`."""

    def __init__(self, store: Store, blobs: Blobs, options: WorkerOptions | None = None) -> None:
        self.store, self.blobs = store, blobs
        self.opts = o = options or WorkerOptions()
        self.id = o.worker_id or "w" + secrets.token_hex(3)
        self.total = capacity(o)
        self.sandbox = sandbox_named(o.sandbox)
        self.sandbox.check()  # a sandbox that cannot work here says so now, not at a job
        self._sandboxes = {o.sandbox: self.sandbox}
        for name in o.allow_sandboxes:  # the ones jobs may ask for are checked now too
            if name not in self._sandboxes:
                self._sandboxes[name] = sandbox_named(name)
                self._sandboxes[name].check()
        self._cgroups: Cgroups | None = None
        self._spaces = Workspaces(o.workspaces or Workspaces.default_root(self.id),
                                  keep=o.keep_workspaces)
        self._attempts = 0
        self._gpus_free = list(o.gpu_ids or (str(i) for i in range(o.gpus)))
        self._gpu_order = {d: i for i, d in enumerate(self._gpus_free)}
        self.running: dict[int, _Running] = {}  # by pidfd
        self._pipes: dict[int, _Running] = {}  # by the read end of their output pipe
        self._poller = select.poll()
        self.stats = _Stats()
        self.draining = False
        self._drain_deadline = 0.0
        self.interrupted: str | None = None  # why the worker was interrupted (see interrupt)
        self.run_seen = False  # with run_id: that run was found stored (see _run_over)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_lock = threading.Lock()  # interrupt() may come from another thread
        # encoded once, not per job; the workspace and JOBFLEET_* variables are added per
        # attempt (see sandbox.env)
        self._base_env = base_env(os.environ, inherit=o.inherit_env)
        self._base_env_list = entries(self._base_env)
        self._call_env = {os.fsdecode(k): os.fsdecode(v) for k, v in base_env(
            os.environ, inherit=o.inherit_env, allowed=ALLOWED_PYTHON).items()}
        self._cwd = os.getcwd()
        self._run_dirs: dict[str, bool] = {}  # a run's folder: is it on this machine?
        # warm interpreters for Python calls: idle ones by folder, busy ones by pid
        self._idle: dict[str, list[Runner]] = {}
        self._busy: dict[int, _Running] = {}
        self._runner_fds: dict[int, Runner] = {}  # its result pipe, output pipe and pidfd
        self._bodies: dict[str, bytes] = {}  # pickled functions by digest
        # short jobs: leased ahead, started as slots free up, their outcomes reported together
        self._ready: deque[Lease] = deque()
        self._unreported: list[Outcome] = []
        self._report_by = 0.0
        self._typical: float | None = None  # a moving average of how long attempts take

    @property
    def memory_limits(self) -> str:
        """How this worker holds jobs to their `memory` (known once it has started)."""
        if self.opts.sandbox == "container":
            return "the container engine"
        return ("a control group per attempt" if self._cgroups is not None
                else "an address-space limit (RLIMIT_AS)")

    # -- lifecycle --------------------------------------------------------------------------
    def stop(self, *, now: bool = False) -> None:
        """Drain: take no new jobs; running ones get `drain_seconds`, then are released.

        A second call, or `now`, releases them at once.
        """
        grace = 0.0 if self.draining or now else self.opts.drain_seconds
        self.draining = True
        self._drain_deadline = time.monotonic() + grace
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def interrupt(self, reason: str) -> None:
        """Stop at once for a reason from outside the worker (a spot reclaim): take no new
        jobs, hand back those held ahead, release running ones now (TERM, then KILL after
        kill_grace) so they are queued again at once, their attempts recording `reason`.
        Safe to call from another thread, also once the loop is over."""
        with self._wake_lock:
            if self._wake_w < 0:
                return
            self.interrupted = reason
            self.stop(now=True)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop()

    def run(self, *, handle_signals: bool = True) -> _Stats:
        """The loop. With `handle_signals` (main thread only), SIGTERM and SIGINT drain it."""
        o = self.opts
        if handle_signals:  # first: a SIGTERM from now on is recorded as a stop, not a death
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        if o.warm_calls:  # before registering: a registered worker is ready for calls
            try:
                self._warm_up()
            except BaseException:
                self._stop_runners()
                raise
        now = time.time()
        self.store.register_worker(WorkerInfo(
            self.id, socket.gethostname(), os.getpid(), o.slots, self.total.cpus,
            self.total.memory, o.gpus,
            o.lease_seconds, o.run_id, "running", now, now, 0))
        log.info("worker %s started", self.id, extra={"action": "worker_started"})
        self._cgroups = Cgroups.open(self.id)
        for sandbox in self._sandboxes.values():
            if isinstance(sandbox, ProcessSandbox):
                sandbox.cgroups = self._cgroups
        self._spaces.open()
        try:
            self._loop()
        finally:
            self._release_all()
            self._stop_runners()
            if self._cgroups is not None:
                self._cgroups.close()
            self._spaces.close()
            self.store.set_worker_state(self.id, "stopped", self.stats.done)
            with self._wake_lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_w = -1
        return self.stats

    def _loop(self) -> None:
        hears = self.store.hears_work
        o, t = self.opts, _Timers(time.monotonic(), max(0.05, self.opts.lease_seconds / 3),
                                  _MAX_IDLE_POLL_HEARING if hears else _MAX_IDLE_POLL)
        poller = self._poller
        poller.register(self._wake_r, select.POLLIN)
        drain_recorded = False
        while True:
            now = time.monotonic()
            if self.draining:
                if not drain_recorded:  # here, not in the signal handler that set draining
                    self.store.set_worker_state(self.id, "draining")
                    drain_recorded = True
                self._release_ready()
                if self._unreported:
                    self._report()
                if not self.running:
                    return
                if now >= self._drain_deadline:
                    for r in self.running.values():
                        self._kill(r, "drain", now)
            else:
                self._sync(now, t)
            if self.running or self._ready:
                t.idle_since = now
            elif self._quota_reached() or self._run_over(now - t.born):
                return
            elif o.idle_exit is not None and now - t.idle_since >= o.idle_exit:
                if not self._work_due():
                    log.info("worker %s idle for %gs, exiting", self.id, o.idle_exit)
                    return
                t.idle_since = now  # a retry is on its way: waiting for it is not idleness
            if hears and not (self.running or self._ready or self._unreported or self.draining):
                self._wait_for_work(t)
                ended = []
            else:
                ended = self._wait(poller, self._next_wake(t))
            if ended:
                self._note(ended)
                self._start_ready()
            now = time.monotonic()
            self._enforce_limits(now)
            self._tick_logs(now)
            if now >= t.next_beat:
                self._heartbeat(now)
                t.next_beat = now + t.beat_every
                t.next_cancel_check = now + _CANCEL_CHECK
                self._watch_progress(now)
            elif self.running and now >= t.next_cancel_check:
                self._cancel(self.store.cancel_requests(self.id), now)
                t.next_cancel_check = now + _CANCEL_CHECK
                self._watch_progress(now)

    def _next_wake(self, t: _Timers) -> float:
        """The soonest moment something needs doing if no job ends before it."""
        wake = [t.next_beat]
        if self._unreported:
            wake.append(self._report_by)
        if self.running:
            wake.append(t.next_cancel_check)
        elif self.opts.idle_exit is not None:
            wake.append(t.idle_since + self.opts.idle_exit)
        if self.draining:
            wake.append(self._drain_deadline)
        elif len(self.running) < self.opts.slots or len(self._ready) <= self._ahead() // 2:
            wake.append(t.next_lease)
        for r in self.running.values():
            if r.kill_at is not None:
                wake.append(r.kill_at)
            elif r.deadline is not None:
                wake.append(r.deadline)
            if r.log.due_at is not None:
                wake.append(r.log.due_at)
        return min(wake)

    def _wait_for_work(self, t: _Timers) -> None:
        """Idle: sleep until the store hears of new work, a signal comes or a timer is due."""
        until = self._next_wake(t)
        self.store.wait_for_work(max(0.0, until - time.monotonic()), also=self._wake_r)
        now = time.monotonic()
        if now < t.next_lease:  # woken early: by work for us, or by some other write?
            due = self.store.next_due(self.total, self.opts.run_id)
            if due is not None and due <= time.time():
                t.next_lease, t.idle_poll = now, _MIN_IDLE_POLL

    def _wait(self, poller: select.poll, until: float) -> list[Outcome]:
        """Sleep until `until`, a job ends or a signal comes; copy output to logs meanwhile.

        Returns the outcomes of the jobs that ended.
        """
        timeout_ms = max(0, int((until - time.monotonic()) * 1000) + 1)
        outcomes = []
        for fd, _ in poller.poll(timeout_ms):
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 64)
            elif fd in self._pipes:
                self._copy_output(self._pipes[fd])
            elif fd in self.running:
                poller.unregister(fd)
                outcomes.append(self._reaped(self.running.pop(fd)))
            elif fd in self._runner_fds:
                outcomes.extend(self._runner_event(fd))
        return outcomes

    def _copy_output(self, r: _Running, *, final: bool = False) -> None:
        """Move what the job printed from its pipe to its log; at EOF (or `final`) close it."""
        fd = r.child.out
        if self._pipes.get(fd) is not r:  # closed already (its number may be reused since)
            return
        while True:
            try:
                data = os.read(fd, _CHUNK)
            except BlockingIOError:
                if not final:
                    return
                data = b""  # whatever still holds the pipe open is not waited for
            if not data:
                self._poller.unregister(fd)
                del self._pipes[fd]
                os.close(fd)
                r.log.close()
                return
            r.log.write(data)
            r.quiet_since = time.monotonic()

    def _work_due(self) -> bool:
        """Is a job that this worker could take waiting out a retry backoff?"""
        return self.store.next_due(self.total, self.opts.run_id) is not None

    def _run_over(self, age: float) -> bool:
        """With run_id: has the run not been stored in time (a minute on, or idle_exit if
        longer; a worker may be started before its run is stored)? With until_done too: has
        it nothing left? Asks the store only while the run is not seen, or with until_done."""
        run_id = self.opts.run_id
        if run_id is None or (self.run_seen and not self.opts.until_done):
            return False
        pending = self.store.pending(run_id)
        if pending is None:
            waited = max(_RUN_APPEARS_WITHIN, self.opts.idle_exit or 0.0)
            if age > waited:
                log.info("worker %s: run %s was not stored within %gs, exiting", self.id, run_id,
                         waited, extra={"action": "run_not_stored"})
                return True
            return False
        self.run_seen = True
        return self.opts.until_done and pending == 0

    def _quota_reached(self) -> bool:
        m = self.opts.max_jobs
        return m is not None and self.stats.leased >= m

    # -- starting ---------------------------------------------------------------------------
    def _free(self, slots: int | None = None) -> Capacity:
        """What the running jobs leave of this worker (`slots`: counting only that many slots)."""
        cpus, memory, gpus = self.total.cpus, self.total.memory, self.total.gpus
        for r in self.running.values():
            s = r.lease.spec
            cpus, memory, gpus = cpus - s.cpus, memory - s.memory, gpus - s.gpus
        free_slots = self.opts.slots - len(self.running)
        return Capacity(free_slots if slots is None else slots, cpus, memory, gpus)

    def _ahead(self) -> int:
        """How many jobs to hold leased beyond the free slots: none unless jobs are short."""
        typical = self._typical
        if typical is None or typical >= _SHORT_JOB or self.draining:
            return 0
        return min(_MAX_AHEAD, int(_AHEAD_SECONDS * self.opts.slots / max(typical, 1e-4)))

    def _wanted(self) -> tuple[Capacity, Capacity | None] | None:
        """What to lease: jobs that fit the free slots together, and jobs to hold ahead; None
        when nothing is wanted (decided first, cheaply: most turns of a busy loop want none)."""
        ahead, held = self._ahead(), len(self._ready)
        slots = 0 if held else self.opts.slots - len(self.running)  # jobs held go first
        more = ahead - held if held <= ahead // 2 else 0
        if self.opts.max_jobs is not None:
            left = self.opts.max_jobs - self.stats.leased
            slots = min(slots, left)
            more = min(more, left - max(slots, 0))
        if slots <= 0 and more <= 0:
            return None
        total = self.total
        return (self._free(slots),
                Capacity(more, total.cpus, total.memory, total.gpus) if more > 0 else None)

    def _sync(self, now: float, t: _Timers) -> None:
        """Report what ended and lease what is wanted, in one transaction, when either is due.

        Jobs that are not short are reported as they end. Short ones are reported together,
        within _REPORT_WITHIN, or when the jobs held ahead run low.
        """
        wanted = self._wanted() if now >= t.next_lease else None
        reporting = bool(self._unreported) and (wanted is not None or self._ahead() == 0
                                                or now >= self._report_by)
        if wanted is None:
            if reporting:
                self._report()
            return
        free, ahead = wanted
        if reporting:
            done, self._unreported = self._unreported, []
            stale, leases = self.store.exchange(
                self.id, done, free, self.opts.lease_seconds, self.opts.run_id, ahead)
            self._counted(done, stale)
        else:
            leases = self.store.lease(
                self.id, free, self.opts.lease_seconds, self.opts.run_id, ahead)
        t.leased(time.monotonic(), len(leases))
        self.stats.leased += len(leases)
        self._ready.extend(leases)
        self._start_ready()

    def _start_ready(self) -> None:
        """Start held jobs in queue order while the first one fits in what is free."""
        if not self._ready:
            return
        free = self._free()
        while self._ready and free.slots > 0:
            spec = self._ready[0].spec
            if spec.cpus > free.cpus or spec.memory > free.memory or spec.gpus > free.gpus:
                return
            started = self._start(self._ready.popleft())
            if isinstance(started, Outcome):
                self._note([started])
                continue
            self.running[started.child.pidfd] = started
            free = Capacity(free.slots - 1, free.cpus - spec.cpus, free.memory - spec.memory,
                            free.gpus - spec.gpus)

    def _release_ready(self, keys: frozenset[int] | None = None) -> None:
        """Hand jobs held ahead (all, or those in `keys`) back to the store, unstarted."""
        back = [x for x in self._ready if keys is None or x.key in keys]
        if back:
            self._note([Outcome(x.key, x.token, UNSTARTED) for x in back])
            self.stats.leased -= len(back)
            self._ready = deque(x for x in self._ready if keys is not None and x.key not in keys)

    def _workdir(self, lease: Lease) -> str | None:
        """The job's working directory when it has one: its own, or its run's (the folder it
        was submitted from) when that folder is on this machine too. A job from another
        machine's folder runs in its workspace; a relative `workdir` is then taken from this
        worker's folder."""
        base = lease.run_workdir
        if base is not None:
            here = self._run_dirs.get(base)
            if here is None:
                here = self._run_dirs[base] = os.path.isdir(base)
            if not here:
                base = None
        wd = lease.spec.workdir
        if not wd:
            return base
        return os.path.join(base or self._cwd, os.path.expanduser(wd))

    def _start(self, lease: Lease) -> _Running | Outcome:
        spec = lease.spec
        key = log_key(lease.run_id, lease.seq, lease.attempt)
        workdir = self._workdir(lease)
        if lease.payload is not None:
            return self._start_call(lease, key, workdir or self._cwd)
        if (spec.skip_if_done and spec.outputs and workdir is not None
                and outputs_done(spec.outputs, workdir, spec.min_size)):
            return Outcome(lease.key, lease.token, "skipped", reason="outputs already exist")
        self._attempts += 1
        name = f"a{self._attempts}"
        try:
            sandbox = self._sandbox_for(spec.sandbox)
            space = self._spaces.make(name)
        except (SandboxError, OSError) as e:
            return Outcome(lease.key, lease.token, "failed", reason=f"{SANDBOX_ERROR}: {e}")
        gpus = self._take_gpus(spec.gpus)
        env = self._attempt_env(lease, space, gpus)
        cwd = workdir or space
        attempt = Attempt(
            spec.command, cwd, env, space, own_path="PATH" not in spec.env,
            memory=spec.memory, cpus=spec.cpus if spec.memory or spec.cpus != 1 else None,
            network=spec.network and self.opts.allow_network, image=spec.image,
            writable=(workdir,) if workdir else (), name=name)
        try:
            sandbox.prepare(attempt)
            child = sandbox.run(attempt)
        except (SandboxError, OSError) as e:
            self._give_back_gpus(gpus)
            with contextlib.suppress(SandboxError, OSError):
                sandbox.teardown(attempt)
            self._spaces.remove(space)
            if isinstance(e, SandboxError):
                reason = f"{SANDBOX_ERROR}: {e.message}"
            elif isinstance(e, FileNotFoundError) and not os.path.isdir(cwd):
                reason = f"workdir {cwd} does not exist on {socket.gethostname()}"
            else:
                reason = f"could not start the job: {e}"
            return Outcome(lease.key, lease.token, "failed", reason=reason)
        deadline = time.monotonic() + spec.timeout if spec.timeout else None
        writer = self.blobs.log_writer(key)
        if spec.secret_env:
            writer = Redactor(writer, spec.secret_values())
        started = time.monotonic()
        r = _Running(lease, writer, child, deadline, time.time(), attempt=attempt, gpus=gpus,
                     quiet_since=started, next_look=started + _look_every(spec.stall_after))
        self._pipes[child.out] = r
        self._poller.register(child.pidfd, select.POLLIN)
        self._poller.register(child.out, select.POLLIN)
        return r

    def _attempt_env(self, lease: Lease, space: str, gpus: tuple[str, ...]) -> list[bytes]:
        """The attempt's environment: the worker's clean base, the workspace, the job's own
        variables, and the JOBFLEET_* ones (see sandbox.env)."""
        spec = lease.spec
        own = [b"HOME=" + space.encode(), b"TMPDIR=" + space.encode()]
        if spec.env:
            merged = self._base_env | dict(x.split(b"=", 1) for x in own) | {
                os.fsencode(k): os.fsencode(v) for k, v in spec.env.items()}
            env = entries(merged)
        else:
            env = [*self._base_env_list, *own]
        env += [b"JOBFLEET_JOB_ID=" + lease.id.encode(),
                b"JOBFLEET_RUN_ID=" + lease.run_id.encode(),
                b"JOBFLEET_ATTEMPT=%d" % lease.attempt]
        if gpus:
            env.append(b"CUDA_VISIBLE_DEVICES=" + ",".join(gpus).encode())
        return env

    def _sandbox_for(self, name: str | None) -> Sandbox:
        """The sandbox a job asks for (None: the worker's); SandboxError if not allowed."""
        if name is None or name == self.opts.sandbox:
            return self.sandbox
        found = self._sandboxes.get(name)
        if found is None:
            allows = self.opts.allow_sandboxes
            raise SandboxError(
                f"the job asks for the {name} sandbox; worker {self.id} runs jobs in "
                f"{self.opts.sandbox}" + (f" and allows {', '.join(allows)}" if allows else ""),
                hint=f"start a worker with --sandbox {name} or --allow-sandbox {name}")
        return found

    def _take_gpus(self, n: int) -> tuple[str, ...]:
        """`n` GPU devices no running job holds (the lease made sure there are enough)."""
        if not n:
            return ()
        taken, self._gpus_free = self._gpus_free[:n], self._gpus_free[n:]
        return tuple(taken)

    def _give_back_gpus(self, gpus: tuple[str, ...]) -> None:
        """Free the devices of an attempt that ended, keeping them in their listed order."""
        order = self._gpu_order
        self._gpus_free = sorted([*self._gpus_free, *gpus], key=order.__getitem__)

    # -- Python calls -----------------------------------------------------------------------
    def _start_call(self, lease: Lease, key: str, cwd: str) -> _Running | Outcome:
        idle = self._idle.get(cwd)
        runner = idle.pop() if idle else None
        try:
            if runner is None:
                runner = self._new_runner(cwd)
            runner.send(lease.key, lease.payload or b"", self.blobs, self._bodies)
        except (OSError, LookupError) as e:
            if runner is not None:
                self._retire(runner)
            return Outcome(lease.key, lease.token, "failed", reason=f"could not start the call: {e}")
        deadline = time.monotonic() + lease.spec.timeout if lease.spec.timeout else None
        r = _Running(lease, self.blobs.log_writer(key), runner, deadline, time.time())
        self._busy[runner.pid] = r
        return r

    def _new_runner(self, cwd: str) -> Runner:
        runner = Runner.start(
            {**self._call_env, "HOME": self._spaces.root, "TMPDIR": self._spaces.root}, cwd)
        for fd in (runner.pidfd, runner.from_runner, runner.out):
            self._runner_fds[fd] = runner
            self._poller.register(fd, select.POLLIN)
        return runner

    def _warm_up(self) -> None:
        """Start one interpreter per slot now, in this worker's folder (where the calls of a
        run submitted from this folder run), and wait (up to _WARM_WITHIN) until each has
        imported what it needs: the worker registers after this, so a caller waiting for it
        (Executor.wait_for_workers) finds it ready for calls."""
        idle = self._idle.setdefault(self._cwd, [])
        try:
            while len(idle) < self.opts.slots:
                idle.append(self._new_runner(self._cwd))
        except OSError as e:  # not fatal: calls start their interpreters as they come
            log.warning("worker %s: could not start a warm interpreter: %s", self.id, e)
        waiting = select.poll()
        for runner in idle:
            waiting.register(runner.from_runner, select.POLLIN)
            waiting.register(runner.pidfd, select.POLLIN)
        deadline = time.monotonic() + _WARM_WITHIN
        while not all(r.ready for r in idle) and not self.draining:
            left = deadline - time.monotonic()
            events = waiting.poll(max(0, int(left * 1000)) + 1) if left > 0 else []
            if not events or any(fd == r.pidfd for fd, _ in events for r in idle):
                return  # too slow, or one died: calls (and the loop) deal with it
            for r in idle:
                if r.results() is None:  # closed its end: the loop reaps it
                    return

    def _runner_event(self, fd: int) -> list[Outcome]:
        """Output, answers or the death of a warm interpreter."""
        runner = self._runner_fds[fd]
        r = self._busy.get(runner.pid)
        if fd == runner.out:
            self._copy_runner_output(runner, r)
            return []
        if fd == runner.pidfd:  # it died while idle (a busy one is in self.running)
            self._retire(runner)
            return []
        answers = runner.results()
        if not answers or r is None:
            return []  # EOF: its pidfd reports the death
        [(key, data)] = answers  # one call at a time
        del self._busy[runner.pid]
        del self.running[runner.pidfd]
        self._copy_runner_output(runner, r)
        r.log.close()
        if runner.calls >= RECYCLE_AFTER or self.draining:
            self._retire(runner)
        else:
            self._idle.setdefault(self._workdir(r.lease) or self._cwd, []).append(runner)
        return [self._call_outcome(r, data)]

    def _call_outcome(self, r: _Running, data: bytes) -> Outcome:
        lease = r.lease
        done, value = wire.outcome_value(data)
        reason = None if done else f"{getattr(value, 'type_name', type(value).__name__)}: {value}"
        stored = wire.envelope(self.blobs, data,
                               f"results/{lease.run_id}/{lease.seq}-{lease.attempt}.pkl")
        return self._ended(r, "succeeded" if done else "failed",
                           reason=reason and reason.splitlines()[0], result=stored)

    def _copy_runner_output(self, runner: Runner, r: _Running | None) -> None:
        while True:
            try:
                data = os.read(runner.out, _CHUNK)
            except BlockingIOError:
                return
            if not data:
                return
            if r is not None:
                r.log.write(data)

    def _call_died(self, r: _Running) -> Outcome:
        runner = r.child
        assert isinstance(runner, Runner)
        self._copy_runner_output(runner, r)
        r.log.close()
        del self._busy[runner.pid]
        code, sig = self._retire(runner)
        how = f"killed by signal {sig}" if sig is not None else f"exited with status {code}"
        status, reason = self._stopped(r) or (
            "failed", f"the Python process running the call died ({how})")
        return self._ended(r, status, exit_code=code, signal=sig, reason=reason)

    def _retire(self, runner: Runner) -> tuple[int | None, int | None]:
        for fd in (runner.pidfd, runner.from_runner, runner.out):
            if self._runner_fds.pop(fd, None) is not None:
                with contextlib.suppress(KeyError):  # a busy one's pidfd is unregistered already
                    self._poller.unregister(fd)
        for idle in self._idle.values():
            if runner in idle:
                idle.remove(runner)
        return runner.reap()

    def _stop_runners(self) -> None:
        for idle in list(self._idle.values()):
            for runner in list(idle):
                self._retire(runner)

    # -- stopping ---------------------------------------------------------------------------
    def _kill(self, r: _Running, why: str, now: float) -> None:
        """TERM the attempt's group now and KILL it after the grace period."""
        if r.stopping is None:
            r.stopping = why
            r.kill_at = now + self.opts.kill_grace
            r.child.signal_group(signal.SIGTERM)

    def _enforce_limits(self, now: float) -> None:
        for r in self.running.values():
            if r.kill_at is not None:
                if now >= r.kill_at:
                    r.child.signal_group(signal.SIGKILL)
                    r.kill_at = now + 3600  # KILL sent; only the reap is left
            elif r.deadline is not None and now >= r.deadline:
                self._kill(r, "timeout", now)

    def _watch_progress(self, now: float) -> None:
        """Find commands that have stalled (no output and no CPU use for their stall_after)
        and report them (or, with on_stall=retry, stop them); report those moving again."""
        due = [r for r in self.running.values() if not isinstance(r.child, Runner)
               and r.lease.spec.stall_after is not None and now >= r.next_look
               and r.stopping is None]
        if not due:
            return
        used = cpu_seconds(r.child.pid for r in due)
        for r in due:
            spec = r.lease.spec
            assert spec.stall_after is not None
            r.next_look = now + _look_every(spec.stall_after)
            cpu = used.get(r.child.pid, r.cpu)
            if cpu > r.cpu + _CPU_NOISE:
                r.cpu, r.quiet_since = cpu, now
            quiet = now - r.quiet_since
            if quiet >= spec.stall_after and not r.stalled:
                r.stalled = True
                log.warning("job %s stalled: no output and no CPU use for %.0fs",
                            r.lease.id, quiet, extra={"action": "stalled"})
                self.store.mark_stalled(self.id, r.lease.key, r.lease.token, quiet)
                if spec.on_stall == "retry":
                    self._kill(r, "stalled", now)
            elif r.stalled and quiet < spec.stall_after:
                r.stalled = False
                self.store.mark_stalled(self.id, r.lease.key, r.lease.token, None)

    def _tick_logs(self, now: float) -> None:
        """Store output a log writer held back for long enough (remote blob stores)."""
        for r in self.running.values():
            if r.log.due_at is not None and now >= r.log.due_at:
                r.log.tick(now)

    def _reaped(self, r: _Running) -> Outcome:
        if isinstance(r.child, Runner):
            return self._call_died(r)
        code, sig, peak = r.child.reap()
        self._copy_output(r, final=True)
        attempt = r.attempt
        assert attempt is not None
        sandbox = self._sandboxes.get(r.lease.spec.sandbox or self.opts.sandbox, self.sandbox)
        try:
            verdict = sandbox.teardown(attempt)
        except (SandboxError, OSError) as e:
            log.warning("job %s: sandbox teardown failed: %s", r.lease.id, e,
                        extra={"action": "teardown_failed"})
            verdict = None
        spec = r.lease.spec
        reason = None
        stopped = self._stopped(r)
        if stopped:
            status, reason = stopped
        elif code == 0:
            status = "succeeded"
            if spec.outputs:
                status, reason = self._collect_outputs(r.lease, attempt.cwd)
        else:
            status = "failed"
            oom = verdict is not None and verdict.out_of_memory
            reason = failure_reason(code, sig, spec.memory, oom=oom,
                                    address_space=attempt.prepared is None)
        if verdict is not None and verdict.peak_memory:
            peak = verdict.peak_memory
        self._spaces.remove(attempt.workspace)
        return self._ended(r, status, exit_code=code, signal=sig, reason=reason, peak_rss=peak)

    def _collect_outputs(self, lease: Lease, cwd: str) -> tuple[str, str | None]:
        """Store a successful job's declared outputs in the blob store; (status, reason)."""
        patterns = lease.spec.outputs
        missing = missing_outputs(patterns, cwd)
        if missing:
            return "failed", f"declared output missing: {', '.join(missing)}"
        try:
            upload_outputs(self.blobs, lease.run_id, lease.seq, patterns, cwd)
        except OSError as e:
            return "failed", f"could not store its outputs in {self.blobs.url}: {e}"
        return "succeeded", None

    def _stopped(self, r: _Running) -> tuple[str, str] | None:
        """(status, reason) of an attempt this worker stopped itself; None if it ended alone."""
        if r.stopping == "timeout":
            return "failed", f"timed out after {r.lease.spec.timeout:g}s"
        if r.stopping == "cancelled":
            return "cancelled", "cancelled by user"
        if r.stopping == "drain":
            return "released", self.interrupted or "worker stopped before the job finished"
        if r.stopping == "lost":
            return "failed", "lease lost"
        if r.stopping == "stalled":
            return "failed", (f"{STALLED}: no output and no CPU use for"
                              f" {r.lease.spec.stall_after:g}s")
        return None

    def _ended(self, r: _Running, status: str, **recorded: Any) -> Outcome:
        """The outcome of attempt `r`, counted by status, with its log when it wrote one."""
        if status == "succeeded" and r.log.failure() is not None:  # its output is not all there
            status, recorded["reason"] = "failed", r.log.failure()
        self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1
        if r.gpus:
            self._give_back_gpus(r.gpus)
        if isinstance(r.log, Redactor) and recorded.get("reason"):
            recorded["reason"] = r.log.redact_text(recorded["reason"])
        took = time.time() - r.began
        typical = self._typical
        self._typical = took if typical is None else typical + (took - typical) / 8
        return Outcome(r.lease.key, r.lease.token, status, started_at=r.began,
                       log=r.log.key if r.log.written else None, **recorded)

    def _note(self, outcomes: list[Outcome]) -> None:
        """Keep outcomes to report with the next transaction (see _sync)."""
        if not self._unreported:
            self._report_by = time.monotonic() + _REPORT_WITHIN
        self._unreported += outcomes

    def _report(self) -> None:
        done, self._unreported = self._unreported, []
        self._counted(done, self.store.finish(self.id, done))

    def _counted(self, outcomes: list[Outcome], stale: list[int]) -> None:
        self.stats.done += sum(o.status not in ("released", UNSTARTED) and o.key not in stale
                               for o in outcomes)
        for key in stale:
            log.warning("job %s: result not recorded, the lease was lost", key,
                        extra={"action": "stale_result"})

    def _heartbeat(self, now: float) -> None:
        held = [(r.lease.key, r.lease.token) for r in self.running.values()]
        held += [(lease.key, lease.token) for lease in self._ready]
        beat = self.store.heartbeat(self.id, held, self.opts.lease_seconds, self.stats.done)
        for r in self.running.values():
            if r.lease.key in beat.lost:
                self._kill(r, "lost", now)
        if beat.lost:  # a held job whose lease is gone is someone else's now
            self._ready = deque(x for x in self._ready if x.key not in beat.lost)
        self._cancel(beat.cancel, now)

    def _cancel(self, keys: frozenset[int], now: float) -> None:
        for r in self.running.values():
            if r.lease.key in keys:
                self._kill(r, "cancelled", now)
        if keys and self._ready:  # the store cancels them as they come back
            self._release_ready(keys)

    def _release_all(self) -> None:
        """On the way out (also after an error): kill what still runs, hand it and the jobs
        held ahead back, and report everything."""
        self._release_ready()
        for r in self.running.values():
            r.child.signal_group(signal.SIGKILL)
        for r in self.running.values():
            r.stopping = r.stopping if r.stopping in ("cancelled", "timeout") else "drain"
            self._note([self._reaped(r)])
        self.running.clear()
        if self._unreported:
            self._report()
