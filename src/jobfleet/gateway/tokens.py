"""Gateway tokens: what one looks like, how it is kept (hashed), and who holds it.

A token is `jf` + the first letter of its role + `_` + 43 random URL-safe characters
(`jfw_...` for a worker). It is shown once, when made; the store keeps only its SHA-256, so a
copy of the database gives no one a working token. Roles:

- `worker`: lease jobs (of its run only, when the token names one), heartbeat and report on
  its own leases, write those jobs' logs, results and outputs. Nothing else.
- `client`: submit runs and read or act on the runs it submitted (or the one run it names).
- `admin`: everything.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

WORKER, CLIENT, ADMIN = "worker", "client", "admin"
ROLES = (WORKER, CLIENT, ADMIN)
_TOKEN = re.compile(r"jf[wca]_[A-Za-z0-9_-]{43}\Z")


def new_secret(role: str) -> str:
    """A new token for `role` (shown once; only its hash is stored)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: roles are {', '.join(ROLES)}")
    return f"jf{role[0]}_{secrets.token_urlsafe(32)}"


def new_id() -> str:
    """A token's public id, for listing and revoking it (not a secret)."""
    return "t" + secrets.token_hex(4)


def digest(secret: str) -> str:
    """What the store keeps of a token."""
    return hashlib.sha256(secret.encode()).hexdigest()


def looks_like_token(text: str) -> bool:
    return bool(_TOKEN.match(text))


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True, slots=True)
class Principal:
    """Who sent a request: the token's id, role and the run it is limited to (if any)."""

    token_id: str
    role: str
    run_id: str | None = None
    name: str | None = None

    @property
    def admin(self) -> bool:
        return self.role == ADMIN

    def describe(self) -> str:
        scope = f" for run {self.run_id}" if self.run_id else ""
        label = f" ({self.name})" if self.name else ""
        return f"{self.role} token {self.token_id}{label}{scope}"


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A stored token, as `jobfleet token list` shows it (never its secret)."""

    id: str
    role: str
    run_id: str | None
    name: str | None
    created_at: float
    revoked_at: float | None
