"""moto's S3 emulator for the tests: a server process on a free 127.0.0.1 port for the session,
a fresh bucket per test, and the AWS variables that reach it (dummy credentials,
AWS_ENDPOINT_URL), set only for the test and the commands it starts. An emulator, because no
real S3 is reachable here; it speaks the same HTTP API, so s3fs and botocore run their real
code against it. Import the fixtures a test module uses from here.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on a free loopback port, for the whole session."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("moto[server] is not installed (pip install -e '.[dev]')")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and not _accepts(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"moto's server exited:\n{log_path.read_text()}"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class S3:
    """A fresh bucket in the emulator, and the environment that reaches it."""

    env: dict[str, str]
    bucket: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/prefix"

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"],
                            region_name="us-east-1")

    def objects(self) -> list[str]:
        found = self.client().list_objects_v2(Bucket=self.bucket).get("Contents", [])
        return sorted(o["Key"] for o in found)


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
       request: pytest.FixtureRequest) -> S3:
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_endpoint,
        # nothing of this machine's own AWS set-up, and no instance-metadata look-ups
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if "jf" in request.fixturenames:  # the commands a test runs reach the emulator too
        request.getfixturevalue("jf").env.update(env)
    bucket = S3(env, f"jf-{secrets.token_hex(4)}")
    bucket.client().create_bucket(Bucket=bucket.bucket)
    return bucket


