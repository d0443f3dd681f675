"""One worker's or client's connection to a jobfleet server: keep-alive HTTP(S) with a token,
the server's certificate verified, requests retried with backoff while the server is away.

Built on the standard library (`http.client`, `ssl`): a worker needs no package beyond
jobfleet itself, and a request costs it a fraction of a millisecond of CPU. Each thread keeps
its own connection. A request that fails before its answer arrives is sent again with the
`X-Jobfleet-Retry` header: the server then looks for what the first one did (leases handed
out, outcomes recorded) instead of doing it twice.
"""

from __future__ import annotations

import http.client
import json as jsonlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from jobfleet.errors import ConfigError, JobfleetError, NotFound, SpecError, StoreError
from jobfleet.gateway.wire import RETRY_HEADER

log = logging.getLogger("jobfleet.gateway")

#: environment variables that choose a server, the token to show it and the CA to trust
SERVER_ENV, TOKEN_FILE_ENV, TOKEN_ENV, CA_FILE_ENV = (
    "JOBFLEET_SERVER", "JOBFLEET_TOKEN_FILE", "JOBFLEET_TOKEN", "JOBFLEET_CA_FILE")
#: answers that mean "try again": the server (or a proxy before it) cannot serve right now
_RETRY_STATUS = frozenset({502, 503, 504})
_HINT = ("check that `jobfleet server` runs there and is reachable from this machine (address,"
         " port, firewall)")
#: what a lost connection or a server going away raises
_LOST = (OSError, http.client.HTTPException)


class AccessDenied(JobfleetError):
    """The server refused this token for that request."""


def read_token(token_file: str | None = None, token: str | None = None) -> str:
    """The token from `token_file` (or JOBFLEET_TOKEN_FILE), else `token` (or JOBFLEET_TOKEN)."""
    path = token_file or os.environ.get(TOKEN_FILE_ENV)
    if path:
        try:
            text = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the token file {path}: {e.strerror or e}",
                              hint="make one with `jobfleet token create --out FILE` on the"
                                   " server, and copy it here") from None
        if not text:
            raise ConfigError(f"the token file {path} is empty",
                              hint="it should hold one token, as `jobfleet token create` made it")
        return text
    text = (token or os.environ.get(TOKEN_ENV) or "").strip()
    if not text:
        raise ConfigError("a jobfleet server needs a token, and none was given",
                          hint=f"pass --token-file FILE (or set {TOKEN_FILE_ENV}); make one with"
                               " `jobfleet token create --role worker` where the server runs")
    return text


def ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """What verifies the server: the CA in `ca_file` (or JOBFLEET_CA_FILE) only, else the
    system's trust store (which SSL_CERT_FILE and SSL_CERT_DIR change)."""
    path = ca_file or os.environ.get(CA_FILE_ENV)
    try:
        return ssl.create_default_context(cafile=os.path.expanduser(path) if path else None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot use the CA certificate {path}: {e}",
                          hint="give the PEM file of the CA that signed the server's"
                               " certificate") from None


@dataclass(frozen=True, slots=True)
class Answer:
    """A server's answer: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str]
    content: bytes

    def json(self) -> Any:
        return jsonlib.loads(self.content)


class Session:
    """Requests to one server with one token; safe to share between threads."""

    def __init__(self, url: str, token: str, *, ca_file: str | None = None,
                 retry_for: float = 120.0, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{url!r} is not a server URL",
                              hint="write it as https://HOST:PORT (as `jobfleet server` prints)")
        self.url = url.rstrip("/")
        self.retry_for, self.timeout = retry_for, timeout
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._base = parts.path.rstrip("/")
        self._tls = ssl_context(ca_file) if parts.scheme == "https" else None
        self._headers = {"Authorization": f"Bearer {token}", "User-Agent": "jobfleet-gateway/1",
                         "Host": parts.netloc.rpartition("@")[2]}
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()

    # -- connections ------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._tls is not None:
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                                   context=self._tls)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)

    def _send(self, method: str, target: str, body: bytes | Iterable[bytes] | None,
              headers: dict[str, str], timeout: float) -> Answer:
        conn = self._connection()
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        try:
            conn.request(method, target, body=body, headers=headers,
                         encode_chunked=body is not None and not isinstance(body, bytes))
            r = conn.getresponse()
            content = r.read()
        except BaseException:
            self._drop()  # whatever state it is in, it is not reused
            raise
        if r.will_close:
            self._drop()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, content)

    # -- requests ---------------------------------------------------------------------------
    def request(self, method: str, path: str, *, json: Any = None,
                params: dict[str, Any] | None = None,
                content: bytes | Iterable[bytes] | None = None,
                timeout: float | None = None, retry: bool = True,
                on_retry: Callable[[], Iterable[bytes]] | None = None) -> Answer:
        """Send a request and return its answer (2xx); errors become JobfleetErrors.

        A lost connection or a 502/503/504 is tried again, backing off, for `retry_for`
        seconds (not at all without `retry`); `on_retry` makes a new body for each new try
        (`content` that was a stream).
        """
        target = self._base + quote(path, safe="/:@-._~")
        if params:
            target += "?" + urlencode({k: _param(v) for k, v in params.items() if v is not None})
        headers = dict(self._headers)
        body: bytes | Iterable[bytes] | None = content
        if json is not None:
            body = jsonlib.dumps(json, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        delay, deadline, tries = 0.05, 0.0, 0
        while True:
            if tries:
                headers[RETRY_HEADER] = str(tries)
                if on_retry is not None:
                    body = on_retry()
            try:
                answer = self._send(method, target, body, headers, timeout or self.timeout)
                if answer.status not in _RETRY_STATUS:
                    return self._checked(answer)
                why = f"HTTP {answer.status}: {_detail(answer)[0]}"
            except _LOST as e:
                if isinstance(e, ssl.SSLError) and (hint := _tls_problem(e)):
                    raise StoreError(f"TLS with the jobfleet server {self.url} failed: {e}",
                                     hint=hint) from None
                if not tries and self._tls is None and isinstance(
                        e, http.client.RemoteDisconnected | ConnectionResetError) \
                        and _speaks_tls(self._host, self._port):
                    https = "https" + self.url.removeprefix("http")
                    raise StoreError(f"the jobfleet server {self.url} speaks TLS",
                                     hint=f"use https:// in the URL: {https}") from None
                why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if not retry or self._closed.is_set():
                raise StoreError(f"cannot reach the jobfleet server {self.url}: {why}",
                                 hint=_HINT)
            now = time.monotonic()
            deadline = deadline or now + self.retry_for
            if now + delay > deadline:
                raise StoreError(f"lost the jobfleet server {self.url} and could not get it back"
                                 f" within {self.retry_for:g} s: {why}", hint=_HINT)
            if not tries:
                log.warning("server %s: %s; retrying", self.url, why,
                            extra={"action": "server_retrying"})
            time.sleep(delay)
            delay, tries = min(delay * 2, 2.0), tries + 1

    def json(self, method: str, path: str, **kw: Any) -> Any:
        return self.request(method, path, **kw).json()

    def _checked(self, answer: Answer) -> Answer:
        status = answer.status
        if status < 400:
            return answer
        detail, hint = _detail(answer)
        if status in (401, 403):
            raise AccessDenied(f"the jobfleet server {self.url} refused: {detail}", hint=hint)
        if status == 404:
            raise NotFound(detail, hint=hint)
        if status in (400, 422):
            raise SpecError(detail, hint=hint)
        raise StoreError(f"the jobfleet server {self.url} failed: {detail}", hint=hint)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


def _param(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _detail(answer: Answer) -> tuple[str, str | None]:
    """The server's explanation of a refusal: (detail, hint)."""
    try:
        body = answer.json()
    except ValueError:
        text = answer.content.decode("utf-8", "replace").strip()[:500]
        return text or f"HTTP {answer.status}", None
    if not isinstance(body, dict):
        return str(body), None
    detail = body.get("detail")
    if isinstance(detail, list):  # FastAPI's validation errors
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', ())))}: {d.get('msg')}"
                           for d in detail if isinstance(d, dict))
    return str(detail or f"HTTP {answer.status}"), body.get("hint")


def _tls_problem(e: ssl.SSLError) -> str | None:
    """What to do about a TLS handshake that failed for good, or None (a connection cut in
    the middle: worth another try)."""
    text = str(e)
    if isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
        return ("this machine does not trust the server's certificate: give the CA that signed"
                " it with --ca-file FILE (or JOBFLEET_CA_FILE, SSL_CERT_FILE); see"
                " docs/gateway.md")
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
        return "the server does not speak TLS there: use http:// or start it with --cert/--key"
    return None


def _speaks_tls(host: str, port: int) -> bool:
    """Whether a TLS handshake (unverified: only the protocol is asked) succeeds there."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            return True
    except OSError:
        return False
