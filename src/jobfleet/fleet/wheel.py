"""A wheel of the running jobfleet, for hosts that must run the same code: its files as they
are here (an editable checkout's too), with the installed distribution's metadata.

Building it needs no build tools and no network; its `build` id (a hash of its contents) tells
a host whether what it installed earlier is still the same code.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import tomllib
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jobfleet

_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo")
#: the fixed time every member is stamped with, so equal contents make equal wheels
_EPOCH = (2020, 1, 1, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class Wheel:
    name: str  # jobfleet-VERSION-py3-none-any.whl
    version: str
    build: str  # a hash of what is inside: the same code gives the same build
    data: bytes


def _package_files() -> list[tuple[str, bytes]]:
    """(path in the wheel, contents) of every file of the jobfleet package, sorted."""
    root = Path(jobfleet.__file__).resolve().parent
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or _SKIP_DIRS & set(rel.parts) or path.suffix in _SKIP_SUFFIXES:
            continue
        found.append((f"jobfleet/{rel.as_posix()}", path.read_bytes()))
    return found


def _metadata(version: str) -> tuple[str, str]:
    """METADATA and entry_points.txt: from pyproject.toml when running from a checkout (an
    editable install's metadata is as old as its `pip install -e`: extras added since are
    missing there), else the installed distribution's."""
    checkout = _from_checkout(version)
    if checkout is not None:
        return checkout
    try:
        dist = importlib.metadata.distribution("jobfleet")
        meta = dist.read_text("METADATA") or ""
        entry_points = dist.read_text("entry_points.txt") or ""
    except importlib.metadata.PackageNotFoundError:
        meta, entry_points = "", ""
    if not meta:
        meta = f"Metadata-Version: 2.1\nName: jobfleet\nVersion: {version}\n"
    if not entry_points:
        entry_points = "[console_scripts]\njobfleet = jobfleet.cli:program\n"
    return meta, entry_points


def _from_checkout(version: str) -> tuple[str, str] | None:
    """Metadata made from the pyproject.toml beside src/jobfleet, if this is a checkout."""
    path = Path(jobfleet.__file__).resolve().parent.parent.parent / "pyproject.toml"
    try:
        project = tomllib.loads(path.read_text())["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None
    if project.get("name") != "jobfleet":
        return None
    lines = ["Metadata-Version: 2.1", "Name: jobfleet", f"Version: {version}"]
    if project.get("requires-python"):
        lines.append(f"Requires-Python: {project['requires-python']}")
    lines += [f"Requires-Dist: {dep}" for dep in project.get("dependencies", [])]
    for extra, deps in sorted(project.get("optional-dependencies", {}).items()):
        lines.append(f"Provides-Extra: {extra}")
        for dep in deps:
            requirement, _, marker = dep.partition(";")
            when = f'({marker.strip()}) and extra == "{extra}"' if marker.strip() \
                else f'extra == "{extra}"'
            lines.append(f"Requires-Dist: {requirement.strip()}; {when}")
    scripts = project.get("scripts", {})
    entry_points = "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in scripts.items())
    return "\n".join(lines) + "\n", entry_points


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}\n"


@cache
def build_wheel() -> Wheel:
    """The running jobfleet as a wheel (built once per process)."""
    version = jobfleet.__version__
    meta, entry_points = _metadata(version)
    info = f"jobfleet-{version}.dist-info"
    members = _package_files() + [
        (f"{info}/METADATA", meta.encode()),
        (f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: jobfleet\nRoot-Is-Purelib: true\n"
                          b"Tag: py3-none-any\n"),
        (f"{info}/entry_points.txt", entry_points.encode()),
    ]
    build = hashlib.sha256()
    for path, data in members:
        build.update(f"{path}\0{len(data)}\0".encode())
        build.update(data)
    record = "".join(_record_line(path, data) for path, data in members) + f"{info}/RECORD,,\n"
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in [*members, (f"{info}/RECORD", record.encode())]:
            member = zipfile.ZipInfo(path, _EPOCH)
            member.external_attr = 0o644 << 16
            member.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(member, data)
    return Wheel(f"jobfleet-{version}-py3-none-any.whl", version, build.hexdigest()[:16],
                 out.getvalue())
