"""`jobfleet server` (the worker gateway and dashboard) and `jobfleet token create|list|revoke`."""

from __future__ import annotations

import json as jsonlib
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from jobfleet.cli.app import (
    BlobsOpt,
    JsonOpt,
    StoreOpt,
    app,
    connect,
    connect_store,
    err,
    out,
    settings,
)
from jobfleet.cli.fmt import escape
from jobfleet.errors import ConfigError, NotFound

if TYPE_CHECKING:
    from jobfleet.blobs import Blobs
    from jobfleet.config import Settings
    from jobfleet.gateway.db import GatewayDB
    from jobfleet.store import Store

token_app = typer.Typer(help="Make, list and revoke the tokens of `jobfleet server`.",
                        no_args_is_help=True)
app.add_typer(token_app, name="token")


def _gateway_db(store: str | None) -> tuple[Store, GatewayDB]:
    from jobfleet.gateway.db import gateway_db

    db = connect_store(settings(store))
    return db, gateway_db(db)


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option("--role", help="worker, client or admin.")],
    run: Annotated[str | None, typer.Option(
        "--run", help="Limit the token to this run (a worker leases only its jobs; a client "
                      "reads and acts on it only).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="A note: who or what holds it.")]
    = None,
    to: Annotated[Path | None, typer.Option(
        "--out", metavar="FILE", help="Write the token to FILE (mode 600) instead of printing"
                                      " it.")] = None,
    store: StoreOpt = None,
) -> None:
    """Make a token for `jobfleet server`; it is shown once (the store keeps only its hash)."""
    import time

    from jobfleet.gateway.tokens import ADMIN, ROLES, TokenInfo, digest, new_id, new_secret

    if role not in ROLES:
        raise ConfigError(f"--role {role!r} is not a role", hint=f"roles are: {', '.join(ROLES)}")
    if run and role == ADMIN:
        raise ConfigError("an admin token cannot be limited to a run",
                          hint="use --role client or --role worker with --run")
    db, tokens = _gateway_db(store)
    run_id = db.run(run).id if run else None
    info = TokenInfo(new_id(), role, run_id, name, time.time(), None)
    secret = new_secret(role)
    tokens.add_token(info, digest(secret))
    what = f"{role} token {info.id}" + (f" for run {run_id}" if run_id else "")
    if to is not None:
        fd = os.open(to, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        os.chmod(to, 0o600)
        out.print(escape(f"{what} written to {to}"))
    else:
        err.print(escape(f"{what} (shown once: keep it in a file of mode 600, e.g. for"
                         " --token-file):"))
        print(secret)
    tokens.close()
    db.close()


@token_app.command("list")
def token_list(store: StoreOpt = None, json: JsonOpt = False) -> None:
    """The tokens: id, role, run, name, when made and revoked (never the secrets)."""
    from jobfleet.cli.fmt import iso

    db, tokens = _gateway_db(store)
    found = tokens.tokens()
    tokens.close()
    db.close()
    if json:
        out.print(jsonlib.dumps([{"id": t.id, "role": t.role, "run": t.run_id, "name": t.name,
                                  "created_at": iso(t.created_at),
                                  "revoked_at": iso(t.revoked_at)} for t in found], indent=2))
        return
    if not found:
        out.print("no tokens yet: make one with `jobfleet token create --role worker`")
    for t in found:
        state = f"revoked {iso(t.revoked_at)}" if t.revoked_at else "active"
        out.print(escape(f"{t.id}  {t.role:<6}  {t.run_id or '-':<8}  {state:<8}  "
                         f"{t.name or ''}"))


@token_app.command("revoke")
def token_revoke(token_id: Annotated[str, typer.Argument(metavar="ID")],
                 store: StoreOpt = None) -> None:
    """Revoke a token by its id (`jobfleet token list`): servers refuse it within 5 s."""
    db, tokens = _gateway_db(store)
    info = tokens.revoke(token_id)
    tokens.close()
    db.close()
    if info is None:
        raise NotFound(f"there is no token {token_id}", hint="`jobfleet token list` shows them")
    out.print(escape(f"{info.role} token {info.id} revoked"))


@app.command()
def server(
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on (0.0.0.0: every one).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8787,
    cert: Annotated[Path | None, typer.Option(
        "--cert", metavar="FILE", help="TLS certificate (PEM, with its chain).")] = None,
    key: Annotated[Path | None, typer.Option(
        "--key", metavar="FILE", help="The certificate's private key (PEM).")] = None,
    allow_http: Annotated[bool, typer.Option(
        "--allow-http", help="Serve plain HTTP beyond loopback (behind a TLS proxy only).")]
    = False,
    no_dashboard: Annotated[bool, typer.Option(
        "--no-dashboard", help="Serve the worker gateway only.")] = False,
    store: StoreOpt = None,
    blobs: BlobsOpt = None,
) -> None:
    """Serve the worker gateway (/v1) and the dashboard: workers and clients need only a token."""
    from jobfleet.dashboard.access import TOKEN_ENV, is_loopback, new_token

    if (cert is None) != (key is None):
        raise ConfigError("--cert and --key go together",
                          hint="give both: the certificate and its private key")
    for path in (cert, key):
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"cannot read {path}", hint="check the path and its permissions")
    local = is_loopback(host)
    if not local and cert is None and not allow_http:
        raise ConfigError(
            f"the server would listen on {host}, beyond this machine, without TLS: tokens would"
            " cross the network in the clear",
            hint="give --cert FILE --key FILE (docs/gateway.md makes them with a private CA),"
                 " or --allow-http when a TLS proxy stands in front")
    try:
        import uvicorn  # noqa: F401  (serve's)

        from jobfleet.gateway.server import create_server, serve
    except ImportError as e:
        raise ConfigError(f"the server needs packages that are not installed ({e.name})",
                          hint="pip install 'jobfleet[dashboard]'") from None
    s = settings(store, blobs)
    dash_token = os.environ.get(TOKEN_ENV, "").strip() or new_token()
    web = create_server(s.store, s.blobs, dashboard=not no_dashboard,
                        dashboard_token=dash_token, protect_reads=not local)
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    address = f"{'https' if cert else 'http'}://{shown}:{port}"
    from jobfleet.blobs import mask_url

    out.print(escape(f"jobfleet server of {mask_url(s.store)} at {address}"))
    out.print(escape(f"  workers: jobfleet worker --server {address} --token-file FILE"))
    if not no_dashboard:
        secret = "$" + TOKEN_ENV if os.environ.get(TOKEN_ENV) else dash_token
        out.print(escape(f"  dashboard: {address}/?token={secret}"))
    serve(web, host=host, port=port, log_level="warning",
          ssl_certfile=str(cert) if cert else None, ssl_keyfile=str(key) if key else None,
          timeout_graceful_shutdown=5)


# -- the worker's side: `jobfleet worker --server URL --token-file FILE` ------------------------
ServerOpt = Annotated[str | None, typer.Option(
    "--server", metavar="URL", envvar="JOBFLEET_SERVER",
    help="Take jobs from a `jobfleet server` (https://HOST:PORT) instead of the store; no store"
         " or blob credentials are needed here (env JOBFLEET_SERVER).")]
TokenFileOpt = Annotated[str | None, typer.Option(
    "--token-file", metavar="FILE",
    help="With --server: the file holding this worker's token (env JOBFLEET_TOKEN_FILE, or the"
         " token itself in JOBFLEET_TOKEN).")]
CaFileOpt = Annotated[str | None, typer.Option(
    "--ca-file", metavar="FILE",
    help="With --server: trust only this CA (PEM) for the server's certificate (env"
         " JOBFLEET_CA_FILE; else the system's, or SSL_CERT_FILE).")]


def connect_worker(s: Settings, server: str | None, token_file: str | None,
                   ca_file: str | None) -> tuple[Store, Blobs]:
    """The store and blobs a worker uses: the server's (with --server), else the settings'."""
    if not server:
        if token_file or ca_file:
            raise ConfigError("--token-file and --ca-file go with --server URL",
                              hint="give --server (or JOBFLEET_SERVER), or leave them out")
        return connect(s)
    from jobfleet.gateway import connect as connect_gateway

    found = connect_gateway(server, token_file=token_file, ca_file=ca_file)
    os.environ.pop("JOBFLEET_TOKEN", None)  # read: no job sees it, even with --inherit-env
    return found
