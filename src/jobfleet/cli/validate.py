"""`jobfleet validate [FILE]`: check the settings and a job file, submitting nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from jobfleet.blobs import mask_url
from jobfleet.cli.app import BlobsOpt, JsonOpt, StoreOpt, app, out
from jobfleet.cli.fmt import dumps, escape
from jobfleet.config import SettingProblem, Settings, load_settings
from jobfleet.errors import SpecError
from jobfleet.store.urls import masked

FileArg = Annotated[
    Path | None,
    typer.Argument(metavar="[FILE]", help="A job file to check (.csv .tsv .json .jsonl .yaml).",
                   show_default=False),
]


@app.command()
def validate(file: FileArg = None, store: StoreOpt = None, blobs: BlobsOpt = None,
             json: JsonOpt = False) -> None:
    """Check the settings (and a job file) without submitting anything.

    Lists every setting with where its value comes from, then every problem with its fix.
    Exits 0 when there is none, 2 otherwise.
    """
    found: list[SettingProblem] = []
    s = load_settings({"store": store, "blobs": blobs}, problems=found)
    problems = [_setting_problem(p) for p in found if not p.warning]
    warnings = [_setting_problem(p) for p in found if p.warning]
    checked: dict[str, Any] | None = None
    if file is not None:
        from jobfleet.spec.validate import validate_jobs

        count, errors = validate_jobs(file)
        problems += [_job_problem(e) for e in errors]
        checked = {"path": str(file), "jobs": count, "problems": len(errors)}
    if json:
        out.print(dumps({"ok": not problems, "settings": _settings_json(s), "file": checked,
                         "problems": problems, "warnings": warnings}))
    else:
        _print(s, checked, problems, warnings)
    if problems:
        raise typer.Exit(2)


def _shown(s: Settings, name: str) -> str:
    """A setting's value fit to print: no password, durations with their unit."""
    value = getattr(s, name)
    if name == "store":
        return masked(value) if "://" in value else str(value)
    if name == "blobs":
        return mask_url(value)
    if isinstance(value, float):
        return f"{value:g}s"
    return str(value)


def _source(s: Settings, name: str) -> str:
    line = s.lines.get(name)
    source = s.sources[name]
    return source if line is None else f"{source}:{line}"


def _settings_json(s: Settings) -> list[dict[str, Any]]:
    return [{"name": name, "value": _shown(s, name), "source": s.sources[name],
             "line": s.lines.get(name)} for name in s.sources]


def _setting_problem(p: SettingProblem) -> dict[str, Any]:
    return {"where": p.where, "source": p.source, "line": p.line, "setting": p.setting,
            "column": None, "message": p.message, "fix": p.fix}


def _job_problem(e: SpecError) -> dict[str, Any]:
    where = e.source or ""
    if e.line is not None:
        where += f":{e.line}"
    column = f"column '{e.column}'" if e.column is not None else ""
    prefix = ": ".join(part for part in (where, column) if part)
    message = e.message.removeprefix(f"{prefix}: ") if prefix else e.message
    if e.hint:
        fix = e.hint
    elif e.column is not None and e.line is not None:
        fix = f"correct the value of '{e.column}' on line {e.line}"
    else:
        fix = "correct the file there"
    return {"where": where, "source": e.source, "line": e.line, "setting": None,
            "column": e.column, "message": message, "fix": fix}


def _problem_text(p: dict[str, Any]) -> str:
    where = p["where"]
    if p["column"] is not None:
        where += f": column '{p['column']}'"
    return f"{where}: {p['message']}; fix: {p['fix']}"


def _print(s: Settings, checked: dict[str, Any] | None, problems: list[dict[str, Any]],
           warnings: list[dict[str, Any]]) -> None:
    out.print("[bold]settings[/]")
    shown = {name: _shown(s, name) for name in s.sources}
    width = max(map(len, shown.values()))
    for name, value in shown.items():
        out.print(f"  {name:<14} {escape(value):<{width}}  [dim]{escape(_source(s, name))}[/]")
    if checked is not None:
        n = checked["problems"]
        state = f"[red]{n} problem{'s' * (n != 1)}[/]" if n else "[green]ok[/]"
        out.print(f"[bold]{escape(checked['path'])}[/]: {checked['jobs']} valid"
                  f" job{'s' * (checked['jobs'] != 1)}, {state}")
    for title, items, style in (("problems", problems, "red"), ("warnings", warnings, "yellow")):
        if items:
            out.print(f"[bold {style}]{title} ({len(items)})[/]")
            for p in items:
                out.print(f"  {escape(_problem_text(p))}")
    if not problems:
        out.print("[green]no problems[/]" + (" (see the warnings)" if warnings else ""))
