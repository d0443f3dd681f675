"""`jobfleet dashboard`: serve the live pages, the JSON API and /metrics of one store."""

from __future__ import annotations

import os
import socket
from typing import Annotated

import typer

from jobfleet.blobs import mask_url
from jobfleet.cli.app import BlobsOpt, StoreOpt, app, out, settings
from jobfleet.cli.fmt import escape
from jobfleet.errors import ConfigError


@app.command()
def dashboard(
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on; anything but loopback needs a token.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8765,
    store: StoreOpt = None,
    blobs: BlobsOpt = None,
) -> None:
    """Serve a live dashboard, a JSON API (/docs) and Prometheus metrics (/metrics).

    Retry and cancel always need the token (JOBFLEET_DASHBOARD_TOKEN, or one made and printed).
    """
    from jobfleet.dashboard.access import TOKEN_ENV, is_loopback, new_token

    token = os.environ.get(TOKEN_ENV, "").strip() or None
    local = is_loopback(host)
    if not local and token is None:
        raise ConfigError(
            f"the dashboard would listen on {host}, beyond this machine, without a token",
            hint=f"set {TOKEN_ENV} to a long random secret (e.g. `openssl rand -hex 24`), "
                 "or listen on --host 127.0.0.1")
    try:
        import uvicorn

        from jobfleet.dashboard.app import create_app
    except ImportError as e:
        raise ConfigError(f"the dashboard needs packages that are not installed ({e.name})",
                          hint="pip install 'jobfleet[dashboard]'") from None
    s = settings(store, blobs)
    made = token is None
    token = token or new_token()
    web = create_app(s.store, s.blobs, token, protect_reads=not local)
    # every address: name the machine, which is what another one would open
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    address = f"http://{shown}:{port}/"
    secret = token if made else f"${TOKEN_ENV}"
    out.print(escape(f"dashboard of {mask_url(s.store)}"))
    out.print(escape(f"  open {address}?token={secret}  (once: this browser then keeps it)"))
    out.print(escape(f"  API {address}docs   metrics {address}metrics"))
    uvicorn.run(web, host=host, port=port, log_level="warning")
