"""Connections to PostgreSQL: URLs shown without their password, opening with a clear error,
one transaction per operation retried across a lost connection, and LISTEN for new work.

Only the PostgreSQL store imports this module (and so psycopg), when a URL asks for it.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from jobfleet.errors import StoreError
from jobfleet.store.urls import MASK, conninfo, masked

try:
    import psycopg
except ImportError:  # pragma: no cover - the extra is missing
    raise StoreError(
        "the PostgreSQL store needs psycopg, which is not installed",
        hint="pip install 'jobfleet[postgres]'",
    ) from None

T = TypeVar("T")
#: a connection whose rows are tuples
Conn = psycopg.Connection[Any]
log = logging.getLogger(__name__)

#: the channel `submit`, `append`, `retry` and a job going back to the queue notify
CHANNEL = "jobfleet_jobs"
#: SQLSTATE classes worth another try: connection exceptions, operator intervention (the
#: server shutting down or starting up) and transaction rollbacks (deadlocks, serialization)
_RETRY_STATES = ("08", "57P", "40")
_HINT = ("check that the PostgreSQL server is running and reachable from this machine, and the"
         " host, port, database and user in the URL (a password comes from the URL, PGPASSWORD"
         " or ~/.pgpass); or pass --store with another URL")


def _reason(e: BaseException, secret: str | None) -> str:
    """A driver error in one line, with the password (if any) scrubbed."""
    lines = (" ".join(line.split()) for line in str(e).splitlines())
    text = "; ".join(line for line in lines if line).removeprefix("connection failed: ")
    return text.replace(secret, MASK) if secret else text


def _sleep(timeout: float, also: int | None) -> None:
    """Sleep `timeout` seconds, or less if `also` becomes readable."""
    if also is None:
        time.sleep(timeout)
    else:
        poller = select.poll()
        poller.register(also, select.POLLIN)
        poller.poll(max(0, round(timeout * 1000)))


class Connector:
    """Opens connections to one database, and runs transactions on one that it keeps."""

    def __init__(self, url: str, *, retry_for: float = 30.0, connect_timeout: int = 10) -> None:
        self.url = masked(url)
        self._conninfo = conninfo(url)
        self._secret = urlsplit(url).password
        self.retry_for = retry_for
        self._connect_timeout = connect_timeout
        self._conn: Conn | None = None
        self._lock = threading.RLock()
        self._listener: Conn | None = None
        self._listen_lock = threading.Lock()

    # -- connections ------------------------------------------------------------------------
    def connect(self) -> Conn:
        """A new autocommit connection; a StoreError saying what to check if none can be had."""
        try:
            return self._new("jobfleet")
        except psycopg.Error as e:
            raise StoreError(f"cannot connect to the store {self.url}: "
                             f"{_reason(e, self._secret)}", hint=_HINT) from None

    def _connection(self) -> Conn:
        if self._conn is None or self._conn.closed:
            self._conn = self._new("jobfleet")
        return self._conn

    def _new(self, name: str) -> Conn:
        return psycopg.connect(self._conninfo, autocommit=True,
                               connect_timeout=self._connect_timeout, application_name=name)

    def open(self) -> None:
        """Connect now, failing at once (no retries) with a clear error."""
        with self._lock:
            self._conn = self.connect()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
        with self._listen_lock:
            if self._listener is not None:
                self._listener.close()

    # -- transactions -----------------------------------------------------------------------
    def transact(self, work: Callable[[Conn, bool], T]) -> T:
        """Run `work(conn, retrying)` in one transaction and commit it.

        A lost connection (server restart, network), a deadlock or a serialization failure
        rolls the transaction back and runs `work` again on a fresh connection, backing off, for
        up to `retry_for` seconds; then a StoreError. `retrying` tells `work` that an earlier
        try may have committed without our hearing of it (the answer to COMMIT was lost), so it
        can look for what it did before doing it again.
        """
        delay, deadline, retrying = 0.05, 0.0, False
        with self._lock:
            while True:
                try:
                    conn = self._connection()
                    with conn.transaction():
                        return work(conn, retrying)
                except psycopg.OperationalError as e:
                    if not self._worth_retrying(e):
                        raise
                    now = time.monotonic()
                    deadline = deadline or now + self.retry_for
                    if now + delay > deadline:
                        raise StoreError(
                            f"lost the connection to the store {self.url} and could not get it"
                            f" back within {self.retry_for:g} s: {_reason(e, self._secret)}",
                            hint=_HINT) from None
                    if not retrying:
                        log.warning("store %s: %s; retrying", self.url, _reason(e, self._secret),
                                    extra={"action": "store_retrying"})
                    time.sleep(delay)
                    delay, retrying = min(delay * 2, 2.0), True

    def _worth_retrying(self, e: psycopg.OperationalError) -> bool:
        """Whether `e` is a lost connection or a rolled-back transaction; a broken connection is
        dropped, to be opened again."""
        conn = self._conn
        lost = conn is None or conn.closed or conn.broken
        if lost and conn is not None:
            conn.close()
        return lost or e.sqlstate is None or e.sqlstate.startswith(_RETRY_STATES)

    # -- LISTEN -----------------------------------------------------------------------------
    def wait(self, timeout: float, also: int | None = None) -> None:
        """Block until a notification on CHANNEL arrives, `timeout` seconds pass or the file
        descriptor `also` becomes readable.

        The first call (and the first after a lost connection) only starts listening and
        returns at once: work may have come before. While the server cannot be reached it
        sleeps out the timeout (the caller's next operation does the retrying).
        """
        with self._listen_lock:
            conn = self._listener
            if conn is None or conn.closed:
                try:
                    self._listener = self._listen()
                except psycopg.OperationalError:
                    _sleep(timeout, also)
                return
            try:
                poller = select.poll()
                poller.register(conn.fileno(), select.POLLIN)
                if also is not None:
                    poller.register(also, select.POLLIN)
                if any(fd == conn.fileno() for fd, _ in poller.poll(max(0, round(timeout * 1000)))):
                    self._drain(conn)
            except (OSError, psycopg.OperationalError):
                conn.close()  # the next call listens again

    def _listen(self) -> Conn:
        conn = self._new("jobfleet-listen")
        conn.execute(f"LISTEN {CHANNEL}")
        return conn

    def _drain(self, conn: Conn) -> None:
        """Read every notification waiting on the socket (a burst of them is one wake-up)."""
        pgconn = conn.pgconn
        pgconn.consume_input()
        if pgconn.status != psycopg.pq.ConnStatus.OK:
            raise psycopg.OperationalError("the listening connection was lost")
        while pgconn.notifies() is not None:
            pass
