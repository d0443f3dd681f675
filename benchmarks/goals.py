"""The goals of issue 9, checked against a run.py result: one PASS, FAIL, SKIP or INFO line
each, so that a regression shows at a glance."""

from __future__ import annotations

from typing import Any

from common import SUBJECT

#: W1: jobfleet's rate on `true` over xargs's, at least
W1_VS_XARGS = 0.8
#: W2: jobfleet's unchunked rate over the process pool's, at least; Ray's time over jobfleet's
W2_VS_POOL = 0.5
W2_VS_RAY = 4.0
#: W2 with chunksize=100: calls per second, at least
W2_CHUNKED_RATE = 100_000
#: W3: median submit-to-start latency under, ms
W3_MS = {"sqlite": 3.0, "postgres": 10.0}
#: W4: seconds and peak resident bytes of the submitting process, under
W4_SECONDS = 20.0
W4_RSS = 400e6
#: W5: throughput on the largest queue over the smallest, at least
W5_FLAT = 0.8


def _goal(workload: str, status: str, text: str, quick: bool, **measured: Any) -> dict[str, Any]:
    line = f"{status} {workload} {text}"
    if quick and status in ("PASS", "FAIL"):
        line += " [--quick sizes: not a verdict]"
    return {"workload": workload, "status": status, "line": line, **measured}


def _at_least(value: float, goal: float) -> str:
    return "PASS" if value >= goal else "FAIL"


def _w1(r: dict[str, Any], peers: dict[str, Any], q: bool) -> list[dict[str, Any]]:
    out = []
    tools = r["workloads"]["true"]["tools"]
    jf = tools[SUBJECT]
    if "xargs" in tools:
        ratio = tools["xargs"]["median"] / jf["median"]  # rates: the inverse of the times
        out.append(_goal("W1", _at_least(ratio, W1_VS_XARGS),
                         f"`true` x{r['jobs']}: jobfleet {jf['jobs_per_second']:,.0f} jobs/s = "
                         f"{ratio:.2f}x xargs's {tools['xargs']['jobs_per_second']:,.0f} jobs/s "
                         f"(goal >= {W1_VS_XARGS}x), every job's state, exit code and log "
                         "checked", q, ratio=ratio))
    else:
        out.append(_goal("W1", "SKIP", f"`true` vs xargs: xargs skipped "
                         f"({peers.get('xargs', {}).get('skipped', 'not run')})", q))
    if "xargs" in tools and "py-floor" in tools:
        floor = tools["py-floor"]["jobs_per_second"] / tools["xargs"]["jobs_per_second"]
        mine = jf["jobs_per_second"] / tools["py-floor"]["jobs_per_second"]
        out.append(_goal("W1", "INFO", f"`true`: a bare Python loop that only starts and waits"
                         f" for the jobs (py-floor, recording nothing) runs {floor:.2f}x xargs's"
                         f" rate; jobfleet runs {mine:.2f}x the floor's", q))
    for entry in r["workloads"].values():
        rates = ", ".join(f"{name} {t['jobs_per_second']:,.0f}" for name, t in
                          entry["tools"].items())
        out.append(_goal("W1", "INFO", f"`{entry['command']}` jobs/s: {rates}", q))
    return out


def _w2(r: dict[str, Any], peers: dict[str, Any], q: bool) -> list[dict[str, Any]]:
    out = []
    modes = list(r["modes"].items())
    (_, plain), (chunked_name, chunked) = modes[0], modes[1]
    tools, jf = plain["tools"], plain["tools"][SUBJECT]
    if "processpool" in tools:
        ratio = tools["processpool"]["map_median"] / jf["map_median"]
        out.append(_goal("W2", _at_least(ratio, W2_VS_POOL),
                         f"unchunked: jobfleet {jf['calls_per_second']:,.0f} calls/s = "
                         f"{ratio:.2f}x ProcessPoolExecutor's "
                         f"{tools['processpool']['calls_per_second']:,.0f} (goal >= {W2_VS_POOL}x)",
                         q, ratio=ratio))
    else:
        out.append(_goal("W2", "SKIP", "unchunked vs ProcessPoolExecutor: skipped", q))
    if "ray" in tools:
        ratio = tools["ray"]["map_median"] / jf["map_median"]
        out.append(_goal("W2", _at_least(ratio, W2_VS_RAY),
                         f"unchunked: ray/jobfleet = {ratio:.2f}x (ray "
                         f"{tools['ray']['calls_per_second']:,.0f} calls/s; goal >= "
                         f"{W2_VS_RAY:g}x)", q, ratio=ratio))
    else:
        out.append(_goal("W2", "SKIP", "unchunked vs Ray: ray skipped "
                         f"({peers.get('ray', {}).get('skipped', 'not run')})", q))
    rate = chunked["tools"][SUBJECT]["calls_per_second"]
    out.append(_goal("W2", _at_least(rate, W2_CHUNKED_RATE),
                     f"{chunked_name}: jobfleet {rate:,.0f} calls/s (goal >= "
                     f"{W2_CHUNKED_RATE:,})", q, calls_per_second=rate))
    for name, entry in modes:
        rates = ", ".join(f"{t} {e['calls_per_second']:,.0f}" for t, e in entry["tools"].items())
        out.append(_goal("W2", "INFO", f"{name} calls/s: {rates}", q))
    return out


def _w3(r: dict[str, Any], postgres: dict[str, Any], q: bool) -> list[dict[str, Any]]:
    out = []
    for store, target in W3_MS.items():
        m = r["stores"].get(store)
        if m is None:
            out.append(_goal("W3", "SKIP", f"{store} submit-to-start latency: not measured "
                             f"({postgres.get('skipped', 'not run')})", q))
            continue
        status = "PASS" if m["median_ms"] < target else "FAIL"
        out.append(_goal("W3", status, f"{store} median submit-to-start latency "
                         f"{m['median_ms']:.2f} ms (p90 {m['p90_ms']:.2f} ms; goal < {target:g} ms)",
                         q, median_ms=m["median_ms"]))
    return out


def _w4(r: dict[str, Any], q: bool) -> list[dict[str, Any]]:
    seconds, rss = r["median"], r["peak_rss_max"]
    return [
        _goal("W4", "PASS" if seconds < W4_SECONDS else "FAIL",
              f"submit {r['jobs']:,} jobs from a file: {seconds:.1f} s median "
              f"({r['jobs_per_second']:,.0f} jobs/s; goal < {W4_SECONDS:g} s)", q,
              seconds=seconds),
        _goal("W4", "PASS" if rss < W4_RSS else "FAIL",
              f"submit {r['jobs']:,} jobs from a file: peak RSS {rss / 1e6:.0f} MB "
              f"(largest of the runs; goal < {W4_RSS / 1e6:.0f} MB)", q, peak_rss=rss),
    ]


def _w5(r: dict[str, Any], q: bool) -> list[dict[str, Any]]:
    queues = list(r["queues"].items())
    (small, first), (large, last) = queues[0], queues[-1]
    ratio = last["median"] / first["median"]
    per = ", ".join(f"{int(n):,}: {e['per_job_ms']:.2f} ms" for n, e in queues)
    out = [_goal("W5", _at_least(ratio, W5_FLAT),
                 f"throughput with {int(large):,} queued = {ratio:.2f}x that with "
                 f"{int(small):,} (goal >= {W5_FLAT}x); per job: {per}", q, ratio=ratio)]
    if "worker_cpu_median" in first:  # less disturbed by a busy machine than the wall time
        cpu = ", ".join(f"{int(n):,}: {e['worker_cpu_median']:.2f} s" for n, e in queues)
        best = max(last["jobs_per_second"]) / max(first["jobs_per_second"])
        out.append(_goal("W5", "INFO", f"worker CPU for {r['take']:,} jobs by queue size: {cpu}; "
                         f"best runs' throughput {int(large):,} vs {int(small):,}: {best:.2f}x", q))
    return out


def _w6(r: dict[str, Any], q: bool) -> list[dict[str, Any]]:
    out = []
    for name, c in r["configurations"].items():
        vs = r["ratios"].get(f"{name}/sqlite-1")
        tail = f", {vs:.2f}x sqlite-1's" if vs is not None else " (the reference)"
        out.append(_goal("W6", "INFO", f"{name}: {c['jobs_per_second']:,.0f} jobs/s{tail} "
                         "(no goal set)", q))
    return out


def evaluate(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The goal lines of every workload in `result`, in workload order."""
    q, w, peers = result["quick"], result["workloads"], result.get("peers", {})
    out: list[dict[str, Any]] = []
    if "W1" in w:
        out += _w1(w["W1"], peers, q)
    if "W2" in w:
        out += _w2(w["W2"], peers, q)
    if "W3" in w:
        out += _w3(w["W3"], result.get("postgres", {}), q)
    if "W4" in w:
        out += _w4(w["W4"], q)
    if "W5" in w:
        out += _w5(w["W5"], q)
    if "W6" in w:
        out += _w6(w["W6"], q)
    return out
