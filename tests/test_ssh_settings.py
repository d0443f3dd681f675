"""The ssh provider's settings: every mistake refused before anything starts, with the
setting's name; what jobfleet.toml and flags write is understood."""

from __future__ import annotations

import getpass
from pathlib import Path

import pytest

from jobfleet.errors import ConfigError
from jobfleet.fleet import provider_named


@pytest.mark.parametrize(("setting", "value", "words"), [
    ("hosts", "user@:x", "hosts"),
    ("hosts", "root@host:99999", "port"),
    ("hosts", "a@b,a@b", "twice"),
    ("hosts", "", "not set"),
    ("hosts", ["a@b", "c d@e"], "'c d' is not a user name"),
    ("workers_per_host", 0, "at least 1"),
    ("bootstrap_attempts", "many", "bootstrap_attempts"),
    ("connect_timeout", "soon", "connect_timeout"),
    ("install", "sometimes", "auto"),
    ("ssh_key", "/nonexistent/key", "no private key file"),
    ("setup", "/nonexistent/setup.sh", "no setup script"),
    ("known_hosts", "/nonexistent/known_hosts", "known_hosts"),
    ("hostz", "a@b", "no setting 'hostz'"),
])
def test_a_bad_setting_is_refused_before_anything_starts(setting: str, value: object,
                                                          words: str) -> None:
    settings = {"hosts": "me@example.org", setting: value}
    with pytest.raises(ConfigError) as e:
        provider_named("ssh", "f", settings)
    message = str(e.value)
    assert setting in message and words in message, message
    assert "providers.ssh" in message


def test_settings_as_written_in_jobfleet_toml_are_understood(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    key.write_text("not a key")
    with pytest.raises(ConfigError, match="ssh_key"):
        provider_named("ssh", "f", {"hosts": ["a@h"], "ssh_key": str(key)})
    p = provider_named("ssh", "f", {"hosts": ["alice@gpu1:2222", "bob@[::1]", "gpu3"],
                                    "workers_per_host": "3", "connect_timeout": "5s",
                                    "install": "never", "known_hosts": "ignore"})
    described = p.describe()
    assert described["hosts"] == ["alice@gpu1:2222", "bob@[::1]:22",
                                  f"{getpass.getuser()}@gpu3:22"]
    assert described["install"] == "never" and described["workers_per_host"] == 3
    assert described["ssh_key"] == "ssh agent / default keys"
