"""One worker's or client's connection to a jobfleet server: keep-alive HTTPS with a token,
the server's certificate verified, requests retried with backoff while the server is away.

A request that fails before its answer arrives is sent again with the `X-Jobfleet-Retry`
header: the server then looks for what the first one did (leases handed out, outcomes
recorded) instead of doing it twice.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jobfleet.errors import ConfigError, JobfleetError, NotFound, SpecError, StoreError
from jobfleet.gateway.wire import RETRY_HEADER

try:
    import httpx
except ImportError:  # pragma: no cover - the extra is missing
    raise ConfigError("talking to a jobfleet server needs httpx, which is not installed",
                      hint="pip install 'jobfleet[gateway]'") from None

log = logging.getLogger("jobfleet.gateway")

#: environment variables that choose a server, the token to show it and the CA to trust
SERVER_ENV, TOKEN_FILE_ENV, TOKEN_ENV, CA_FILE_ENV = (
    "JOBFLEET_SERVER", "JOBFLEET_TOKEN_FILE", "JOBFLEET_TOKEN", "JOBFLEET_CA_FILE")
#: answers that mean "try again": the server (or a proxy before it) cannot serve right now
_RETRY_STATUS = frozenset({502, 503, 504})
_HINT = ("check that `jobfleet server` runs there and is reachable from this machine (address,"
         " port, firewall), and that its certificate is trusted here (--ca-file or SSL_CERT_FILE"
         " for a private CA)")


class AccessDenied(JobfleetError):
    """The server refused this token for that request."""


def is_server_url(text: str) -> bool:
    return text.startswith(("https://", "http://"))


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


def ssl_context(ca_file: str | None) -> ssl.SSLContext | bool:
    """What verifies the server: the CA in `ca_file` (or JOBFLEET_CA_FILE) only, else the
    system's trust (SSL_CERT_FILE / SSL_CERT_DIR where set)."""
    path = ca_file or os.environ.get(CA_FILE_ENV)
    if not path:
        return True
    try:
        return ssl.create_default_context(cafile=os.path.expanduser(path))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot use the CA certificate {path}: {e}",
                          hint="give the PEM file of the CA that signed the server's"
                               " certificate") from None


class Session:
    """Requests to one server with one token; safe to share between threads."""

    def __init__(self, url: str, token: str, *, ca_file: str | None = None,
                 retry_for: float = 120.0, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{url!r} is not a server URL",
                              hint="write it as https://HOST:PORT (as `jobfleet server` prints)")
        self.url = url.rstrip("/")
        self.retry_for = retry_for
        self._client = httpx.Client(
            base_url=self.url, verify=ssl_context(ca_file),
            headers={"Authorization": f"Bearer {token}", "User-Agent": "jobfleet-gateway/1"},
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=4))
        self._closed = threading.Event()

    def request(self, method: str, path: str, *, json: Any = None,
                params: dict[str, Any] | None = None, content: Any = None,
                timeout: float | None = None, retry: bool = True,
                on_retry: Callable[[], Any] | None = None) -> httpx.Response:
        """Send a request and return its answer (2xx); errors become JobfleetErrors.

        A lost connection or a 502/503/504 is tried again, backing off, for `retry_for`
        seconds (not at all without `retry`); `on_retry` makes a new body for each new try
        (`content` that was a stream).
        """
        delay, deadline, tries = 0.05, 0.0, 0
        while True:
            headers = {RETRY_HEADER: str(tries)} if tries else None
            try:
                answer = self._client.request(
                    method, path, json=json, params=params, headers=headers,
                    content=on_retry() if on_retry is not None and tries else content,
                    timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout)
                if answer.status_code not in _RETRY_STATUS:
                    return self._checked(answer)
                why = f"HTTP {answer.status_code}: {_detail(answer)[0]}"
            except httpx.TransportError as e:
                if isinstance(e, httpx.ConnectError) and (tls := _tls_problem(e)):
                    raise StoreError(f"TLS with the jobfleet server {self.url} failed: {e}",
                                     hint=tls) from None
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

    def _checked(self, answer: httpx.Response) -> httpx.Response:
        status = answer.status_code
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
        self._client.close()


def _detail(answer: httpx.Response) -> tuple[str, str | None]:
    """The server's explanation of a refusal: (detail, hint)."""
    try:
        body = answer.json()
    except ValueError:
        return answer.text.strip()[:500] or answer.reason_phrase, None
    if not isinstance(body, dict):
        return str(body), None
    detail = body.get("detail")
    if isinstance(detail, list):  # FastAPI's validation errors
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', ())))}: {d.get('msg')}"
                           for d in detail if isinstance(d, dict))
    return str(detail or answer.reason_phrase), body.get("hint")


def _tls_problem(e: httpx.ConnectError) -> str | None:
    """What to do about a TLS handshake that failed (not worth retrying), or None."""
    text = str(e)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return ("this machine does not trust the server's certificate: give the CA that signed"
                " it with --ca-file FILE (or JOBFLEET_CA_FILE, SSL_CERT_FILE); see"
                " docs/gateway.md")
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
        return "the server does not speak TLS there: use http:// or start it with --cert/--key"
    return None
