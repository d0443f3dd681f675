"""A `jobfleet server` for the tests: in a thread of the test (to share the test's clock) or as
its own process (to kill and restart), on a free port of 127.0.0.1; tokens made straight in
the store; a TLS CA made on the spot; and a proxy that loses answers on purpose."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from conftest import wait_for
from pg import free_port


def make_token(store_location: str, role: str, run_id: str | None = None,
               name: str | None = None) -> str:
    """A new token of `role` in the store at `store_location` (opened, so migrated)."""
    from jobfleet.gateway.db import gateway_db
    from jobfleet.gateway.tokens import TokenInfo, digest, new_id, new_secret
    from jobfleet.store import open_store

    with open_store(store_location) as store:
        db = gateway_db(store)
        secret = new_secret(role)
        db.add_token(TokenInfo(new_id(), role, run_id, name, time.time(), None), digest(secret))
        db.close()
    return secret


class ThreadServer:
    """The server's app served by uvicorn in a thread of this process."""

    def __init__(self, app: Any, *, cert: Path | None = None, key: Path | None = None) -> None:
        import uvicorn

        self.port = free_port()
        scheme = "https" if cert else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                ssl_certfile=str(cert) if cert else None,
                                ssl_keyfile=str(key) if key else None,
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_for(lambda: self._server.started or not self._thread.is_alive(), 30,
                 what="the server to start")
        assert self._server.started, "the server did not start"

    def stop(self) -> None:
        release = getattr(self._server.config.app, "release", None)
        if release is not None:
            release()  # workers waiting for work go at once
        self._server.should_exit = True
        self._thread.join(timeout=30)


class ProcessServer:
    """`jobfleet server` as a process of its own: started, killed and started again on the
    same port."""

    def __init__(self, store: str, blobs: str, log: Path, port: int | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.store, self.blobs, self.log = store, blobs, log
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBFLEET_")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jobfleet", "server", "--port", str(self.port),
                 "--store", self.store, "--blobs", self.blobs, "--no-dashboard", *self.extra],
                env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        wait_for(self._answers, 60, what=f"the server on port {self.port} (log: {self.log})")

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the server exited: {self.log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
            return True
        return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


def make_ca(folder: Path) -> tuple[Path, Path, Path]:
    """A CA of our own and a certificate it signed for 127.0.0.1 and localhost:
    (ca.pem, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("jobfleet test CA"))
          .issuer_name(name("jobfleet test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class AnswerLosingProxy:
    """A TCP proxy in front of a server that, when told, lets the next request through and
    drops its answer with the connection: the server did the work, the client never hears."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lose = threading.Event()
        self.lost = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_next_answer(self) -> None:
        self._lose.set()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(conn, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, conn, self._dropping),
                             daemon=True).start()

    def _dropping(self, data: bytes, src: socket.socket, dst: socket.socket) -> bool:
        """Whether to drop this answer (and both connections)."""
        if not self._lose.is_set():
            return False
        self._lose.clear()
        self.lost += 1
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        return True

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket,
              drop: Callable[[bytes, socket.socket, socket.socket], bool] | None) -> None:
        try:
            while data := src.recv(65536):
                if drop is not None and drop(data, src, dst):
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._listener.close()


@contextlib.contextmanager
def thread_server(app: Any, **kw: Any) -> Iterator[ThreadServer]:
    server = ThreadServer(app, **kw)
    try:
        yield server
    finally:
        server.stop()
