"""run.py's tables: as text for the terminal, and as the Markdown page docs/benchmarks.md."""

from __future__ import annotations

from typing import Any

from common import SUBJECT

TITLES = {
    "W1": "shell jobs, 2 slots: jobfleet run against GNU parallel and xargs",
    "W2": "Python calls, 2 workers: jobfleet Executor against a process pool, Dask, Ray, Celery",
    "W3": "submit-to-start latency on an idle, running worker",
    "W4": "submitting a big job file (`jobfleet submit`): time and peak memory",
    "W5": "a worker's throughput as the queue grows",
    "W6": "store throughput: PostgreSQL with 2 and 4 workers beside SQLite with 1",
}
Table = tuple[list[str], list[list[str]]]


def _vs(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


def tables(w: str, r: dict[str, Any]) -> list[tuple[str, Table]]:
    """The workload's tables, each with a caption."""
    if w == "W1":
        out = []
        for entry in r["workloads"].values():
            rows = [[tool, f"{t['median']:.3f}", f"{t['min']:.3f}", f"{t['jobs_per_second']:,.0f}",
                     f"{t['per_job_ms']:.2f}", f"{t['cpu_median']:.2f}",
                     _vs(entry["ratios"].get(f"{tool}/{SUBJECT}"))]
                    for tool, t in entry["tools"].items()]
            out.append((f"{r['jobs']:,} x `{entry['command']}`, {r['slots']} slots, "
                        f"{r['repeat']} interleaved runs per tool (wall time, launch to exit)",
                        (["tool", "median s", "min s", "jobs/s", "ms/job", "cpu s",
                          "tool/jobfleet time"], rows)))
        return out
    if w == "W2":
        out = []
        for name, entry in r["modes"].items():
            rows = [[tool, f"{t['map_median']:.3f}", f"{t['calls_per_second']:,.0f}",
                     f"{t['per_call_us']:.0f}", f"{t['total_median']:.3f}",
                     _vs(entry["ratios"].get(f"{tool}/{SUBJECT}"))]
                    for tool, t in entry["tools"].items()]
            out.append((f"{r['calls']:,} calls of `inc(x) = x + 1`, {name}, {r['workers']} "
                        f"workers, {r['repeat']} interleaved runs per tool",
                        (["tool", "map s", "calls/s", "us/call", "total s",
                          "tool/jobfleet map time"], rows)))
        return out
    if w == "W3":
        rows = [[store, f"{m['median_ms']:.2f}", f"{m['p90_ms']:.2f}", f"{m['min_ms']:.2f}",
                 f"{m['max_ms']:.2f}", f"{m['submit_median_ms']:.2f}"]
                for store, m in r["stores"].items()]
        return [(f"one `true` job submitted to an idle worker, {r['samples']} samples per store, "
                 "submit call to the job's recorded start",
                 (["store", "median ms", "p90 ms", "min ms", "max ms", "submit call ms"], rows))]
    if w == "W4":
        rows = [[f"{r['jobs']:,}", f"{r['median']:.2f}", f"{r['min']:.2f}",
                 f"{r['jobs_per_second']:,.0f}", f"{r['per_job_us']:.1f}",
                 f"{r['peak_rss_max'] / 1e6:.0f}", f"{r['store_bytes'] / 1e6:.0f}"]]
        return [(f"`jobfleet submit` of a CSV (`{r['row']}` per row, "
                 f"{r['file_bytes'] / 1e6:.0f} MB) into an empty SQLite store, {r['repeat']} runs",
                 (["jobs", "median s", "min s", "jobs/s", "us/job", "peak RSS MB", "store MB"],
                  rows))]
    if w == "W5":
        first = next(iter(r["queues"]))
        rows = [[f"{int(n):,}", f"{e['median']:,.0f}", f"{e['per_job_ms']:.3f}",
                 _vs(r["ratios"].get(f"{n}/{first}")),
                 f"{e['worker_cpu_median']:.2f}" if "worker_cpu_median" in e else ""]
                for n, e in r["queues"].items()]
        return [(f"one worker ({r['slots']} slots) takes the first {r['take']:,} `true` jobs of a "
                 f"queue of N, {r['repeat']} interleaved runs per N; jobs/s from the first start "
                 "to the last end; worker CPU: user + system seconds of the worker and its jobs, "
                 "start-up included",
                 (["queued N", "jobs/s", "ms/job", f"vs {int(first):,}", "worker CPU s"], rows))]
    if w == "W6":
        rows = [[name, str(c["workers"]), f"{c['median']:.3f}", f"{c['jobs_per_second']:,.0f}",
                 _vs(r["ratios"].get(f"{name}/sqlite-1"))]
                for name, c in r["configurations"].items()]
        return [(f"{r['jobs']:,} `true` jobs submitted at once, 2 slots per worker, "
                 f"{r['repeat']} interleaved runs per configuration, submit to last end",
                 (["configuration", "workers", "median s", "jobs/s", "vs sqlite-1"], rows))]
    raise ValueError(w)


def text_table(w: str, r: dict[str, Any]) -> str:
    lines = []
    for caption, (head, rows) in tables(w, r):
        widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
        lines.append(f"  {caption}")
        for row in [head, *rows]:
            cells = [row[0].ljust(widths[0])] + [c.rjust(n) for c, n in zip(row[1:], widths[1:],
                                                                               strict=True)]
            lines.append("    " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def _md(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def markdown(result: dict[str, Any]) -> str:
    """docs/benchmarks.md: the machine, the goals and every workload's table."""
    m, v = result["machine"], result.get("versions", {})
    parts = [
        "# Benchmarks",
        "",
        "Generated by `benchmarks/run.py` (do not edit by hand; see "
        "[benchmarks/README.md](../benchmarks/README.md) for what each workload measures). "
        "Every peer ran in the same invocation as jobfleet, interleaved with it; figures are "
        "medians.",
        "",
        "Reproduce with:",
        "",
        "```sh",
        result["command"],
        "```",
        "",
    ]
    if result.get("quick"):
        parts += ["**A `--quick` run: tiny sizes, the figures are not the goals'.**", ""]
    machine_rows = [
        ["date", result["started_at"]],
        ["CPU", f"{m.get('cpu_model')} ({m.get('cpu_count')} cores)"],
        ["memory", _gib(m.get("memory_bytes"))],
        ["kernel", m.get("kernel", "?")],
        ["Python", m.get("python", "?")],
        ["load average (1, 5, 15 min) at the start / end",
         " / ".join(", ".join(f"{x:.2f}" for x in la)
                    for la in (m.get("load_average", ()), m.get("load_average_end", ())))],
        *[[name, str(version)] for name, version in v.items()],
    ]
    skipped = {name: p["skipped"] for name, p in result.get("peers", {}).items() if "skipped" in p}
    if "skipped" in result.get("postgres", {}):
        skipped["postgresql"] = result["postgres"]["skipped"]
    machine_rows += [[f"{name} (skipped)", why.replace("|", "/")] for name, why in skipped.items()]
    parts += ["## Machine and versions", "", _md(["", ""], machine_rows), ""]
    parts += ["## Goals (issue 9)", "", _md(["status", "workload", "measured"],
                                            [[g["status"], g["workload"],
                                              g["line"].split(" ", 2)[2].replace("|", "/")]
                                             for g in result["goals"]]), ""]
    for w, r in result["workloads"].items():
        la = r.get("load_average_before")
        parts += [f"## {w}: {TITLES[w]}", ""]
        if la:
            parts += [f"Load average before: {la[0]:.2f}; took {r['wall_seconds']:.0f} s.", ""]
        for caption, (head, rows) in tables(w, r):
            parts += [caption + ":", "", _md(head, rows), ""]
    return "\n".join(parts)
