"""Who may see and change what: the dashboard's token, and one store connection per thread.

Reading is open on loopback; changing anything (retry, cancel) always takes the token, sent
by the page's script in a header. A browser gets the token once, from the URL that
`jobfleet dashboard` prints (`/?token=...`): the server then keeps it in an HttpOnly,
SameSite=Strict cookie and writes it into the pages it serves to that browser, for the script
to send. A cookie alone never authorizes a change, so another site cannot forge one.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import threading
from collections.abc import Callable, Mapping

from jobfleet.store import Store

#: the header a client sends the token in (or `Authorization: Bearer TOKEN`)
TOKEN_HEADER = "X-Jobfleet-Token"
#: the query parameter that hands a browser the token on its first visit
TOKEN_PARAM = "token"
#: the environment variable that sets the token
TOKEN_ENV = "JOBFLEET_DASHBOARD_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the dashboard on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def new_token() -> str:
    """A random token for a dashboard started without one."""
    return secrets.token_urlsafe(24)


class Token:
    """The secret, and where a request may carry it."""

    def __init__(self, secret: str, *, protect_reads: bool) -> None:
        if not secret:
            raise ValueError("the dashboard token must not be empty")
        self._secret = secret.encode()
        self.protect_reads = protect_reads

    def matches(self, candidate: str | None) -> bool:
        """Compare in constant time; None (no token sent) never matches."""
        return candidate is not None and hmac.compare_digest(candidate.encode(), self._secret)

    @property
    def value(self) -> str:
        return self._secret.decode()

    @staticmethod
    def cookie_name(port: int | None) -> str:
        """One cookie per port: dashboards on one host must not overwrite each other's."""
        return f"jobfleet_token_{port or 0}"

    @staticmethod
    def from_headers(headers: Mapping[str, str]) -> str | None:
        """The token sent in `X-Jobfleet-Token` or as `Authorization: Bearer ...`.

        `headers` is looked up by lower-case name (as Starlette's headers are).
        """
        sent = headers.get(TOKEN_HEADER.lower())
        if sent:
            return sent
        scheme, _, value = (headers.get("authorization") or "").partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None


class StorePerThread:
    """Opens the store once per thread that asks, and closes them all at the end.

    The web server answers requests on a pool of threads; each keeps its own connection
    (a SQLite connection, later a PostgreSQL one), so no two requests share a cursor.
    """

    def __init__(self, url: str, opener: Callable[[str], Store]) -> None:
        self._url = url
        self.url = url  # as the store shows itself (a password masked) once one is open
        self._open = opener
        self._local = threading.local()
        self._all: list[Store] = []
        self._lock = threading.Lock()
        self._generation = 0  # bumped by close: a thread's older connection is not reused

    def get(self) -> Store:
        held: tuple[int, Store] | None = getattr(self._local, "held", None)
        if held is not None and held[0] == self._generation:
            return held[1]
        db = self._open(self._url)
        self.url = db.url
        with self._lock:
            self._all.append(db)
            self._local.held = (self._generation, db)
        return db

    def close(self) -> None:
        with self._lock:
            opened, self._all = self._all, []
            self._generation += 1
        for db in opened:
            db.close()
