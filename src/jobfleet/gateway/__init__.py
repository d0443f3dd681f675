"""The worker gateway: `jobfleet server` in front of the store and blob store, and the client
side that workers (`jobfleet worker --server URL --token-file FILE`) and clients use instead
of database credentials.

- `connect(url, ...)`: a `GatewayStore` and a `GatewayBlobs` that speak to a server (with
  the standard library only: a worker needs no extra package).
- `jobfleet.gateway.server.create_server`: the server's app (needs the `dashboard` extra).
- `jobfleet.gateway.tokens`: what tokens are and which roles there are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobfleet.gateway.blobs import GatewayBlobs
    from jobfleet.gateway.store import GatewayStore


def connect(url: str, *, token_file: str | None = None, token: str | None = None,
            ca_file: str | None = None,
            retry_for: float = 120.0) -> tuple[GatewayStore, GatewayBlobs]:
    """The store and blob store of the server at `url`, with the token from `token_file` (or
    `token`, or JOBFLEET_TOKEN_FILE / JOBFLEET_TOKEN), trusting the CA in `ca_file` (or
    JOBFLEET_CA_FILE, or the system's)."""
    from jobfleet.gateway.blobs import GatewayBlobs
    from jobfleet.gateway.client import Session, read_token
    from jobfleet.gateway.logs import PendingLogs
    from jobfleet.gateway.store import GatewayStore

    session = Session(url, read_token(token_file, token), ca_file=ca_file, retry_for=retry_for)
    logs = PendingLogs()
    store, blobs = GatewayStore(session, logs), GatewayBlobs(session, logs)
    store.blobs = blobs
    return store, blobs


__all__ = ["connect"]
