"""The Python API end to end: real scripts in their own interpreters, a real worker process,
warm interpreters that really die. Functions live in the scripts' `__main__`, as users write them."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from conftest import Jobfleet, pids_with, wait_for
from jobfleet.api import wire
from jobfleet.spec import make_job
from jobfleet.store import NewRun


def script(jf: Jobfleet, body: str, *args: str, timeout: float = 120) -> Any:
    """Run `body` as a script in jf's folder and store; it prints one JSON line, returned."""
    path = jf.cwd / f"script_{abs(hash(body))}.py"
    path.write_text("import json, os, sys, time\nimport jobfleet\n" + textwrap.dedent(body))
    p = subprocess.run([sys.executable, str(path), *args], cwd=jf.cwd, env=jf.env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"script failed ({p.returncode})\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_map_over_ten_thousand_items_in_order_and_a_remote_value_error(jf: Jobfleet) -> None:
    out = script(jf, """
        def work(x):
            if x == 4321:
                raise ValueError(f"item {x} is cursed")
            return x * 3

        if __name__ == "__main__":
            with jobfleet.Executor(workers=2) as ex:
                good = list(ex.map(work, range(4000)))
                futures = [ex.submit(work, x) for x in range(4000, 10000)]
                values, error = [], None
                for f in futures:
                    try:
                        values.append(f.result(timeout=120))
                    except ValueError as e:
                        error = {"type": type(e).__name__, "message": str(e),
                                 "remote": str(e.__cause__)}
            print(json.dumps({"good": good, "values": values, "error": error,
                              "run": ex.run_id}))
    """)
    assert out["good"] == [x * 3 for x in range(4000)]
    assert out["values"] == [x * 3 for x in range(4000, 10000) if x != 4321]
    error = out["error"]
    assert error["type"] == "ValueError" and error["message"] == "item 4321 is cursed"
    assert "Traceback" in error["remote"] and "in work" in error["remote"]
    assert 'raise ValueError(f"item {x} is cursed")' in error["remote"]
    # the CLI sees the run like any other
    status = jf.json("status", out["run"])
    assert status["counts"]["succeeded"] == 9999 and status["counts"]["failed"] == 1
    [failed] = jf.json("jobs", out["run"], "--state", "failed")
    assert failed["reason"] == "ValueError: item 4321 is cursed"


def test_a_call_that_kills_its_interpreter_fails_alone(jf: Jobfleet) -> None:
    out = script(jf, """
        import signal
        def work(x):
            print(f"working on {x}", flush=True)
            if x == 13:
                os._exit(7)
            if x == 14:
                os.kill(os.getpid(), signal.SIGKILL)
            return x

        if __name__ == "__main__":
            results = {}
            with jobfleet.Executor(workers=2) as ex:
                for x, f in [(x, ex.submit(work, x)) for x in range(40)]:
                    try:
                        results[x] = f.result(timeout=60)
                    except jobfleet.CallFailed as e:
                        results[x] = f"failed: {e.reason}"
            print(json.dumps({"results": results, "run": ex.run_id}))
    """)
    results = {int(k): v for k, v in out["results"].items()}
    assert results[13] == "failed: the Python process running the call died (exited with status 7)"
    assert results[14] == "failed: the Python process running the call died (killed by signal 9)"
    assert {x: v for x, v in results.items() if x not in (13, 14)} == {
        x: x for x in range(40) if x not in (13, 14)}
    # what the call printed before dying is in its log
    assert "working on 13" in jf("logs", f"{out['run']}-14", check=0).stdout


def test_detached_run_is_finished_and_read_by_another_process(jf: Jobfleet) -> None:
    submitted = script(jf, """
        def square(x):
            return x * x

        if __name__ == "__main__":
            run = jobfleet.submit_map(square, range(1000), name="squares", workers=2)
            print(json.dumps({"run": run.id}))
    """)
    run_id = submitted["run"]  # the submitting process has exited
    read = script(jf, """
        run = jobfleet.attach(sys.argv[1][:6])
        counts = run.wait(timeout=120)
        first = run.results()
        again = jobfleet.attach(run.id).results()
        print(json.dumps({"id": run.id, "counts": counts, "results": first, "same": first == again,
                          "listed": [r.id for r in jobfleet.runs()]}))
    """, run_id)
    assert read["id"] == run_id and run_id in read["listed"]
    assert read["counts"]["succeeded"] == 1000
    assert read["results"] == [x * x for x in range(1000)]
    assert read["same"]
    assert jf.json("runs")[0]["name"] == "squares"


def test_exceptions_that_do_not_unpickle_and_timeouts(jf: Jobfleet) -> None:
    out = script(jf, """
        class Local(Exception):
            def __reduce__(self):
                raise TypeError("not picklable")

        def boom(x):
            raise Local("local trouble")

        def slow(x):
            time.sleep(x)
            return x

        if __name__ == "__main__":
            with jobfleet.Executor(workers=2) as ex:
                try:
                    ex.submit(boom, 1).result(timeout=60)
                except jobfleet.RemoteError as e:
                    remote = {"type": e.type_name, "message": e.message, "tb": e.traceback}
                quick = ex.options(timeout=1)
                late, fast = quick.submit(slow, 30), quick.submit(slow, 0)
                try:
                    late.result(timeout=60)
                except jobfleet.CallFailed as e:
                    timed_out = e.reason
                print(json.dumps({"remote": remote, "timed_out": timed_out,
                                  "fast": fast.result(timeout=60)}))
    """)
    assert out["remote"]["type"] == "Local" and out["remote"]["message"] == "local trouble"
    assert "in boom" in out["remote"]["tb"]
    assert out["timed_out"] == "timed out after 1s"
    assert out["fast"] == 0


def test_big_values_go_to_the_blob_store_and_cleanup_removes_them(jf: Jobfleet) -> None:
    out = script(jf, """
        def double(data):
            return data + data

        if __name__ == "__main__":
            blob = os.urandom(300_000)
            run = jobfleet.submit_map(double, [blob, b"small"], workers=2)
            run.wait(timeout=60)
            ok = run.results() == [blob + blob, b"smallsmall"]
            removed = run.cleanup()
            after = run.results()
            print(json.dumps({"ok": ok, "removed": removed, "run": run.id,
                              "after": [type(v).__name__ for v in after]}))
    """)
    assert out["ok"]
    assert out["removed"] == 2  # the big argument and the big result
    assert out["after"] == ["CallFailed", "CallFailed"]
    import sqlite3

    with sqlite3.connect(jf.store_path) as db:
        biggest = db.execute("SELECT max(length(payload)), max(length(result)) FROM jobs").fetchone()
    assert all(size is None or size < wire.INLINE_LIMIT for size in biggest), biggest


def test_cleanup_refuses_while_calls_run(jf: Jobfleet) -> None:
    out = script(jf, """
        def nap(x):
            time.sleep(x)

        if __name__ == "__main__":
            run = jobfleet.submit_map(nap, [30], workers=1)
            deadline = time.monotonic() + 30
            while run.status()["running"] == 0:
                assert time.monotonic() < deadline, "the call never started"
                time.sleep(0.05)
            try:
                run.cleanup()
                refused = None
            except jobfleet.StillRunning as e:
                refused = str(e)
            run.cleanup(force=True)
            counts = run.wait(timeout=30)
            print(json.dumps({"refused": refused, "counts": counts}))
    """)
    assert "still has 1 jobs queued or running" in out["refused"]
    assert out["counts"]["cancelled"] == 1


def test_local_workers_exit_when_idle(jf: Jobfleet) -> None:
    out = script(jf, """
        def one(x):
            return 1

        if __name__ == "__main__":
            run = jobfleet.submit_map(one, range(3), workers=1)
            run.wait(timeout=60)
            print(json.dumps({"run": run.id}))
    """)
    with jf.open_store() as db:
        def stopped() -> bool:
            return all(w.state == "stopped" for w in db.workers())
        wait_for(stopped, 20, what="the run's worker to exit when idle")
    assert Path(jf.blobs / "workers" / f"{out['run']}.log").exists()


def processes_in(folder: Path) -> list[str]:
    """Command lines of the live jobfleet processes (workers, warm interpreters) working in
    `folder`: the executor's worker starts in its caller's folder, its interpreters too."""
    found = []
    for pid in pids_with("jobfleet"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/cwd") == str(folder):
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    return found


def test_an_executor_never_used_leaves_no_process_behind(jf: Jobfleet) -> None:
    """The worker starts with the executor, before any call (so it is ready sooner); an
    executor that stores nothing stops it at shutdown, without waiting for its idle exit."""
    out = script(jf, """
        from jobfleet.store import open_store

        def registered(db, deadline):
            while not db.workers() and time.monotonic() < deadline:
                time.sleep(0.02)
            return db.workers()

        if __name__ == "__main__":
            db = open_store(os.environ["JOBFLEET_STORE"])
            ex = jobfleet.Executor(workers=2)
            [before] = registered(db, time.monotonic() + 60)  # no call made
            began = time.monotonic()
            ex.shutdown()
            took = time.monotonic() - began
            [after] = db.workers()
            with jobfleet.Executor(workers=1):  # shut down as its worker may still be starting
                pass
            print(json.dumps({"run": ex.run_id, "before": before.state, "after": after.state,
                              "took": took, "runs": len(db.runs())}))
    """)
    assert out["run"] is None and out["runs"] == 0  # no run was stored
    assert out["before"] == "running" and out["after"] == "stopped"
    assert out["took"] < 3.0  # stopped by shutdown, not by its 3 s idle exit
    assert processes_in(jf.cwd) == []  # shutdown waited: neither worker nor interpreters left


def test_wait_for_workers_returns_once_the_worker_is_in_the_store(jf: Jobfleet) -> None:
    out = script(jf, """
        from jobfleet.store import open_store

        def inc(x):
            return x + 1

        if __name__ == "__main__":
            db = open_store(os.environ["JOBFLEET_STORE"])
            with jobfleet.Executor(workers=0) as none:
                none.wait_for_workers(timeout=0)  # no local worker: nothing to wait for
            with jobfleet.Executor(workers=2) as ex:
                ex.wait_for_workers()
                seen = [(w.state, w.slots) for w in db.workers()]
                values = list(ex.map(inc, range(300), chunksize=100))
            print(json.dumps({"seen": seen, "values": values}))
    """)
    assert out["seen"] == [["running", 2]]
    assert out["values"] == list(range(1, 301))


def test_an_executor_whose_worker_idled_out_before_the_first_call_starts_another(
        jf: Jobfleet) -> None:
    out = script(jf, """
        from jobfleet.store import open_store

        def inc(x):
            return x + 1

        if __name__ == "__main__":
            db = open_store(os.environ["JOBFLEET_STORE"])
            with jobfleet.Executor(workers=1) as ex:
                deadline = time.monotonic() + 60  # the caller is slow: the worker exits idle
                while not (db.workers() and db.workers()[0].state == "stopped"
                           and time.monotonic() < deadline):
                    time.sleep(0.05)
                values = list(ex.map(inc, range(50)))
            print(json.dumps({"values": values, "workers": [w.state for w in db.workers()]}))
    """)
    assert out["values"] == list(range(1, 51))
    assert len(out["workers"]) == 2


def test_a_worker_started_for_a_run_not_stored_yet_serves_it_once_stored(jf: Jobfleet) -> None:
    worker = jf.popen("worker", "--run", "feed0001", "--slots", "2", "--idle-exit", "5")
    with jf.open_store() as db:
        wait_for(db.workers, 30, what="the worker to register")
        db.submit(NewRun(source="test", workdir=str(jf.cwd), id="feed0001"),
                  [make_job(f"echo job {i}", {}, {}, {}) for i in range(3)])
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    assert "run feed0001 (not stored yet: waiting for it)" in out
    assert "3 succeeded" in out
    assert [jf.log("feed0001", i) for i in (1, 2, 3)] == ["job 0\n", "job 1\n", "job 2\n"]
    # a run that never comes: the worker gives up at its idle exit and says so
    p = jf("worker", "--run", "feed0002", "--idle-exit", "0.5", check=2)
    assert "no run feed0002 was stored" in p.stderr
    # a malformed id is still refused at once
    assert "is not a run id" in jf("worker", "--run", "no-such!", check=2).stderr


def test_executor_on_postgresql_and_s3_keeps_the_password_off_command_lines(
        jf: Jobfleet, s3: Any) -> None:
    """The same map on the fleet backends: PostgreSQL (the test server, a fresh database) and
    S3 (moto's emulator, as no real S3 runs here). The worker the executor starts gets the
    store's URL, password and all, through its environment: `ps` never shows it."""
    from pg import fresh_database, require_server

    with fresh_database(require_server()) as url:
        secret = "pw-" + url.rsplit("_", 1)[-1]
        # trust auth: the password is not needed, only carried; this script gets it as the
        # user's own would, not on its command line
        jf.env["TEST_STORE"] = url.replace("postgres@", f"postgres:{secret}@", 1)
        out = script(jf, """
            def command_lines():
                found = []
                for entry in os.listdir("/proc"):
                    try:
                        with open(f"/proc/{entry}/cmdline", "rb") as f:
                            found.append(f.read().replace(bytes(1), b" ").decode())
                    except (OSError, UnicodeDecodeError):
                        pass
                return found

            def square(x):
                return x * x

            if __name__ == "__main__":
                store = os.environ["TEST_STORE"]
                with jobfleet.Executor(workers=2, store=store, blobs=sys.argv[1]) as ex:
                    values = list(ex.map(square, range(300)))
                    big = ex.submit(square, 10**200000).result()  # over the inline limit: S3
                    seen = command_lines()
                print(json.dumps({"values": values, "big": big == 10**400000, "seen": seen,
                                  "run": ex.run_id}))
        """, s3.url)
    assert out["values"] == [x * x for x in range(300)] and out["big"]
    assert any("jobfleet worker" in line for line in out["seen"]), out["seen"]
    assert not [line for line in out["seen"] if secret in line]
    assert any(key.startswith("prefix/payloads/") or key.startswith("prefix/results/")
               for key in s3.objects()), s3.objects()
