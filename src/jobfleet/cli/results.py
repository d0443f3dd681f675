"""`jobfleet results RUN --to DIR`: download a run's uploaded outputs into DIR/SEQ/<path>."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Annotated

import typer

from jobfleet.blobs import BlobError, Blobs, outputs_prefix
from jobfleet.cli.app import BlobsOpt, JsonOpt, StoreOpt, app, connect, err, out, settings
from jobfleet.cli.fmt import dumps, size
from jobfleet.errors import JobfleetError

RunArg = Annotated[str, typer.Argument(metavar="RUN", help="Run id or unique prefix.")]
ToOpt = Annotated[Path, typer.Option("--to", metavar="DIR", help="Folder to download into.",
                                     file_okay=False, dir_okay=True, resolve_path=True)]


class NoOutputs(JobfleetError):
    """The run has no uploaded outputs."""


class UnsafeKey(BlobError):
    """A blob's name would land outside the target folder."""


@app.command()
def results(
    run: RunArg,
    to: ToOpt,
    store: StoreOpt = None,
    blobs: BlobsOpt = None,
    json: JsonOpt = False,
) -> None:
    """Download the outputs a run's jobs uploaded (their `outputs` globs) into DIR/SEQ/<path>."""
    db, blob_store = connect(settings(store, blobs))
    r = db.run(run)
    prefix = outputs_prefix(r.id)
    found = blob_store.find(prefix)
    if not found:
        raise NoOutputs(f"run {r.id} has no uploaded outputs in {blob_store.url}",
                        hint="jobs upload the files their 'outputs' globs match when they "
                             f"succeed; `jobfleet jobs {r.id}` shows which did")
    files, total = download(blob_store, prefix, [key for key, _ in found], to)
    pending = db.pending(r.id) or 0
    if json:
        out.print(dumps({"run": r.id, "files": files, "bytes": total, "to": str(to),
                         "pending": pending}))
        return
    out.print(f"{files} file{'s' if files != 1 else ''}, {size(total)} from run {r.id} to {to}")
    if pending:
        err.print(f"[dim]{pending} jobs are still queued or running: their outputs come later[/]")


def download(blobs: Blobs, prefix: str, keys: list[str], to: Path) -> tuple[int, int]:
    """Copy the blobs `keys` (all under `prefix`) to `to`/<the rest of the key>; (files, bytes).

    Every name is checked before anything is written, so a bad one leaves `to` untouched.
    """
    targets = [(key, to / relative_name(key, prefix, blobs)) for key in keys]
    total = 0
    for key, dest in targets:
        total += blobs.get_file(key, dest)
    return len(targets), total


def relative_name(key: str, prefix: str, blobs: Blobs) -> PurePosixPath:
    """`key` below `prefix`, refused if it could climb out of the target folder."""
    rel = PurePosixPath(key[len(prefix):].lstrip("/"))
    if rel.is_absolute() or not rel.parts or ".." in rel.parts:
        raise UnsafeKey(f"{blobs.url}: the blob {key} has a name that would be written outside"
                        " the target folder", hint="remove it from the blob store, or fetch it "
                                                   "by hand")
    return rel
