"""The gateway's own tables (tokens, which token each worker id and run belongs to) and the few
reads of the jobs table its checks need, on a connection of its own to the store's database.

The tables are made by the store's migrations (`*_tokens.sql`); this module only reads and
writes their rows. SQL is written once with `?` placeholders (PostgreSQL gets `%s`).
"""

from __future__ import annotations

import abc
import sqlite3
import threading
import time
from collections.abc import Sequence
from typing import Any

from jobfleet.gateway.tokens import Principal, TokenInfo
from jobfleet.spec.model import JobSpec
from jobfleet.store import Lease, Store

_TOKEN_COLUMNS = "id, role, run_id, name, created_at, revoked_at"


class GatewayDB(abc.ABC):
    """Rows of the gateway's tables, and checks on who holds which job."""

    @abc.abstractmethod
    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of one statement, committed (a write returns its RETURNING rows)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # -- tokens -----------------------------------------------------------------------------
    def add_token(self, info: TokenInfo, hashed: str) -> None:
        self._all("INSERT INTO tokens (id, hash, role, run_id, name, created_at)"
                  " VALUES (?, ?, ?, ?, ?, ?)",
                  (info.id, hashed, info.role, info.run_id, info.name, info.created_at))

    def principal(self, hashed: str) -> Principal | None:
        """Who holds the token with this hash; None if there is none or it was revoked."""
        rows = self._all("SELECT id, role, run_id, name FROM tokens"
                         " WHERE hash = ? AND revoked_at IS NULL", (hashed,))
        return Principal(*rows[0]) if rows else None

    def tokens(self) -> list[TokenInfo]:
        return [TokenInfo(*r) for r in self._all(
            f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY created_at")]

    def revoke(self, token_id: str) -> TokenInfo | None:
        """Revoke the token with this id (from now on it is refused); None if there is none."""
        self._all("UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                  (time.time(), token_id))
        rows = self._all(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE id = ?", (token_id,))
        return TokenInfo(*rows[0]) if rows else None

    # -- workers and runs bound to tokens ---------------------------------------------------
    def bind_worker(self, worker_id: str, token_id: str) -> str:
        """Bind `worker_id` to the token unless another has it; returns the token it has."""
        self._all("INSERT INTO token_workers (worker_id, token_id, bound_at) VALUES (?, ?, ?)"
                  " ON CONFLICT (worker_id) DO NOTHING", (worker_id, token_id, time.time()))
        return self.worker_token(worker_id) or token_id

    def worker_token(self, worker_id: str) -> str | None:
        rows = self._all("SELECT token_id FROM token_workers WHERE worker_id = ?", (worker_id,))
        return str(rows[0][0]) if rows else None

    def worker_state(self, worker_id: str) -> str | None:
        rows = self._all("SELECT state FROM workers WHERE id = ?", (worker_id,))
        return str(rows[0][0]) if rows else None

    def own_run(self, run_id: str, token_id: str) -> None:
        self._all("INSERT INTO token_runs (run_id, token_id) VALUES (?, ?)"
                  " ON CONFLICT (run_id) DO NOTHING", (run_id, token_id))

    def run_owner(self, run_id: str) -> str | None:
        rows = self._all("SELECT token_id FROM token_runs WHERE run_id = ?", (run_id,))
        return str(rows[0][0]) if rows else None

    def owned_runs(self, token_id: str, limit: int, prefix: str = "") -> list[str]:
        """Ids of the runs this token submitted, newest first."""
        return [r for (r,) in self._all(
            "SELECT t.run_id FROM token_runs t JOIN runs r ON r.id = t.run_id"
            " WHERE t.token_id = ? AND t.run_id LIKE ? ORDER BY r.created_at DESC LIMIT ?",
            (token_id, prefix + "%", limit))]

    def run_exists(self, run_id: str) -> bool:
        return bool(self._all("SELECT 1 FROM runs WHERE id = ?", (run_id,)))

    def run_of_job(self, key: int) -> str | None:
        rows = self._all("SELECT run_id FROM jobs WHERE id = ?", (key,))
        return str(rows[0][0]) if rows else None

    # -- what a worker token's workers hold -------------------------------------------------
    def held(self, worker_id: str) -> list[Lease]:
        """The leases `worker_id` holds now (to hand back leases whose answer was lost)."""
        return [Lease(key, run_id, seq, attempt, token, expires, JobSpec.from_json(spec),
                      workdir, None if payload is None else bytes(payload))
                for key, run_id, seq, attempt, token, spec, payload, expires, workdir in self._all(
                    "SELECT j.id, j.run_id, j.seq, j.attempts, j.lease_token, j.spec, j.payload,"
                    " j.lease_expires, r.workdir FROM jobs j JOIN runs r ON r.id = j.run_id"
                    " WHERE j.state = 'running' AND j.worker_id = ? ORDER BY j.id",
                    (worker_id,))]

    def running_on(self, worker_id: str) -> set[int]:
        """Keys of the jobs `worker_id` runs now."""
        return {int(k) for (k,) in self._all(
            "SELECT id FROM jobs WHERE state = 'running' AND worker_id = ?", (worker_id,))}

    def attempt_held(self, token_id: str, run_id: str, seq: int) -> int | None:
        """The attempt under way of job RUN-SEQ if a worker of this token runs it, else None."""
        rows = self._all(
            "SELECT j.attempts FROM jobs j JOIN token_workers t ON t.worker_id = j.worker_id"
            " WHERE j.run_id = ? AND j.seq = ? AND j.state = 'running' AND t.token_id = ?",
            (run_id, seq, token_id))
        return int(rows[0][0]) if rows else None

    def runs_a_job_of(self, token_id: str, run_id: str) -> bool:
        """Whether a worker of this token runs a job of the run now."""
        return bool(self._all(
            "SELECT 1 FROM jobs j JOIN token_workers t ON t.worker_id = j.worker_id"
            " WHERE j.run_id = ? AND j.state = 'running' AND t.token_id = ? LIMIT 1",
            (run_id, token_id)))


class SQLiteGatewayDB(GatewayDB):
    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, timeout=60,
                                   check_same_thread=False)
        self._lock = threading.Lock()

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def close(self) -> None:
        self._db.close()


class PostgresGatewayDB(GatewayDB):
    def __init__(self, url: str) -> None:
        from jobfleet.store.pgconn import Connector

        self._db = Connector(url)
        self._db.open()

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        def run(c: Any, _: bool) -> list[tuple[Any, ...]]:
            cur = c.execute(sql.replace("?", "%s"), tuple(args))
            return cur.fetchall() if cur.description else []

        return self._db.transact(run)

    def close(self) -> None:
        self._db.close()


def gateway_db(store: Store) -> GatewayDB:
    """The gateway's tables in the database of `store` (opened, so migrated, already)."""
    location = store.location
    if location.startswith(("postgresql://", "postgres://")):
        return PostgresGatewayDB(location)
    return SQLiteGatewayDB(location)
