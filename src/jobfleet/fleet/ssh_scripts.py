"""The scripts the ssh provider runs on a host. Each is fed to `sh -s` (or `python -`) on its
standard input, so nothing in them, the worker's environment least of all, shows in `ps`;
commands inside read /dev/null, not the rest of the script.

On the host, a fleet's files are `~/.cache/jobfleet/fleets/FLEET/WORKER.*`: `state` (the
bootstrap's phase, `key=value` lines, so any process that lists sees the same), `pid`, `log`
(the worker's output), `setup.log` (everything the bootstrap did) and `setup.sh`.
"""

from __future__ import annotations

#: is pid $1 worker $2's process (not a reused pid)? /proc where there is one, else kill -0
_ALIVE = r"""
alive() {
  if [ -d /proc/self ]; then
    [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' < "/proc/$1/cmdline" | grep -qF -- "--id $2 "
  else
    kill -0 "$1" 2>/dev/null
  fi
}
"""

#: args: FLEET_DIR. Per worker: `@@worker W`, its state lines as `=key=value`, `@@stale`
#: when the state has not changed for 5 minutes, `@@old` when neither it nor the worker's log
#: has for an hour, `@@alive PID` / `@@dead PID`, then `@@setup` and `@@log` each followed by
#: the last 20 lines of that log, as `|line`. The files of a worker that is not running and
#: has not changed for a day are removed.
LIST = _ALIVE + r"""
cd "$1" 2>/dev/null || { echo "@@end"; exit 0; }
for s in *.state; do
  [ -f "$s" ] || continue
  w=${s%.state}
  live="" pid=""
  if [ -s "$w.pid" ]; then
    pid=$(cat "$w.pid")
    alive "$pid" "$w" && live=1
  fi
  if [ -z "$live" ] && [ -n "$(find "$s" -mmin +1440 2>/dev/null)" ] \
     && [ -z "$(find "$w.log" -mmin -1440 2>/dev/null)" ]; then
    rm -f "$w.state" "$w.pid" "$w.log" "$w.setup.log" "$w.setup.sh" "$w.setup.pgid"
    continue
  fi
  echo "@@worker $w"
  sed 's/^/=/' "$s"
  [ -n "$(find "$s" -mmin +5 2>/dev/null)" ] && echo "@@stale"
  [ -n "$(find "$s" -mmin +60 2>/dev/null)" ] && [ -z "$(find "$w.log" -mmin -60 2>/dev/null)" ] \
    && echo "@@old"
  if [ -n "$live" ]; then echo "@@alive $pid"; elif [ -n "$pid" ]; then echo "@@dead $pid"; fi
  echo "@@setup"
  tail -n 20 "$w.setup.log" 2>/dev/null | sed 's/^/|/'
  echo "@@log"
  tail -n 20 "$w.log" 2>/dev/null | sed 's/^/|/'
done
echo "@@end"
"""

#: args: FLEET_DIR GRACE_SECONDS WORKER... Stops a setup script still running (its process
#: group); TERM each worker (it drains), wait GRACE; TERM again (it hands its jobs back), wait
#: 5 s; then KILL its process group. Removes the pid files and marks the states stopped (a
#: failed one stays failed).
TERMINATE = _ALIVE + r"""
cd "$1" 2>/dev/null || exit 0
grace=$2
shift 2
pids=""
for w in "$@"; do
  if [ -s "$w.setup.pgid" ]; then
    kill -TERM "-$(cat "$w.setup.pgid")" 2>/dev/null
    rm -f "$w.setup.pgid"
  fi
  [ -s "$w.pid" ] || continue
  pid=$(cat "$w.pid")
  if alive "$pid" "$w"; then
    kill -TERM "$pid" 2>/dev/null
    pids="$pids $pid:$w"
  fi
done
wait_exit() {  # up to $1 tenths of a second for the workers in $pids to exit
  n=0
  while [ -n "$pids" ] && [ "$n" -lt "$1" ]; do
    left=""
    for pw in $pids; do
      if alive "${pw%%:*}" "${pw#*:}"; then left="$left $pw"; fi
    done
    pids=$left
    [ -z "$pids" ] && break
    sleep 0.1
    n=$((n + 1))
  done
}
wait_exit $((grace * 10))
for pw in $pids; do kill -TERM "${pw%%:*}" 2>/dev/null; done
wait_exit 50
for pw in $pids; do
  echo "killed ${pw#*:} (pid ${pw%%:*}): it did not exit after SIGTERM"
  kill -KILL "-${pw%%:*}" 2>/dev/null
  kill -KILL "${pw%%:*}" 2>/dev/null
done
for w in "$@"; do
  rm -f "$w.pid"
  if [ -f "$w.state" ] && ! grep -qx 'phase=failed' "$w.state"; then
    grep -v -e '^phase=' -e '^reason=' "$w.state" > "$w.state.tmp"
    printf 'phase=stopped\nreason=terminated\n' >> "$w.state.tmp"
    mv "$w.state.tmp" "$w.state"
  fi
done
"""

#: a line in the setup log, time first
_SAY = r"""
say() { printf '%s %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*" >> "$dir/$w.setup.log"; }
"""

#: args: FLEET_DIR WORKER PYTHON MODE VENV, with $state (the state file's lines) and $note
#: set before. Marks the worker bootstrapping, notes the attempt, then prints what the rest
#: depends on, as key=value lines: home, python (its version, or `missing`) and executable;
#: with MODE auto, build (what VENV holds); with MODE never, jobfleet (the version the
#: interpreter imports, or `missing`).
BEGIN = _SAY + r"""
dir=$1 w=$2 py=$3 mode=$4 venv=$5
mkdir -p "$dir" || exit 1
printf %s "$state" > "$dir/$w.state.tmp" && mv "$dir/$w.state.tmp" "$dir/$w.state"
say "$note"
echo "home=$HOME"
if ! command -v "$py" >/dev/null 2>&1; then
  say "$py: not found (PATH=$PATH)"
  echo "python=missing"
  exit 0
fi
info=$("$py" -c 'import sys; print("python=%d.%d.%d" % sys.version_info[:3])
print("executable=" + sys.executable)' < /dev/null 2>> "$dir/$w.setup.log")
echo "$info"
say "$py is Python $(echo "$info" | sed -n 's/^python=//p') ($(echo "$info" | sed -n 's/^executable=//p'))"
if [ "$mode" = auto ]; then
  echo "build=$(cat "$venv/jobfleet-build" 2>/dev/null)"
else
  v=$("$py" -c 'import jobfleet; print(jobfleet.__version__)' < /dev/null 2>> "$dir/$w.setup.log")
  echo "jobfleet=${v:-missing}"
  say "$py imports jobfleet ${v:-(none)}"
fi
"""

#: args: FLEET_DIR WORKER, with the setup script already written to $dir/$w.setup.sh and its
#: environment exported. Runs it in $HOME, its output appended to the setup log; prints
#: `status=N`, then (when N is not 0) the log's last lines. While it runs, $w.setup.pgid
#: names its process group, for TERMINATE to stop it.
SETUP = _SAY + r"""
dir=$1 w=$2
script="$dir/$w.setup.sh"
chmod 700 "$script"
pgid=$(ps -o pgid= -p $$ 2>/dev/null | tr -d ' ')
echo "${pgid:-$$}" > "$dir/$w.setup.pgid"
say "running the setup script"
if head -c 2 "$script" | grep -q '^#!'; then
  "$script" < /dev/null >> "$dir/$w.setup.log" 2>&1
else
  sh "$script" < /dev/null >> "$dir/$w.setup.log" 2>&1
fi
status=$?
rm -f "$dir/$w.setup.pgid"
say "the setup script exited $status"
echo "status=$status"
[ "$status" = 0 ] || tail -n 20 "$dir/$w.setup.log"
"""

#: args: FLEET_DIR WORKER SECONDS PYTHON WORKER_ARGS..., with the worker's environment
#: exported and $ready (the state file's lines once it runs) set before. Starts the worker in
#: a session of its own, detached from this connection (it writes its own pid file), then
#: waits until it says it serves (`ready`), has died (`dead`, then its log's last lines) or
#: SECONDS pass (`started`, if alive then).
START = _ALIVE + _SAY + r"""
dir=$1 w=$2 seconds=$3
shift 3
rm -f "$dir/$w.pid"
say "starting worker $w (its log: ~/$dir/$w.log)"
if command -v setsid >/dev/null 2>&1; then detach=setsid; else detach=nohup; fi
$detach sh -c 'echo $$ > "$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' "$dir/$w.pid" \
  "$@" >> "$dir/$w.log" 2>&1 < /dev/null &
outcome=started
n=0
while [ "$n" -lt $((seconds * 10)) ]; do
  if [ -s "$dir/$w.pid" ]; then
    alive "$(cat "$dir/$w.pid")" "$w" || { outcome=dead; break; }
    if grep -qF "worker $w:" "$dir/$w.log" 2>/dev/null; then outcome=ready; break; fi
  fi
  sleep 0.1
  n=$((n + 1))
done
if [ "$outcome" = started ] && ! { [ -s "$dir/$w.pid" ] && alive "$(cat "$dir/$w.pid")" "$w"; }
then
  outcome=dead
fi
say "worker $w: $outcome"
if [ "$outcome" = dead ]; then
  echo dead
  tail -n 20 "$dir/$w.log"
  exit 0
fi
printf %s "$ready" > "$dir/$w.state.tmp" && mv "$dir/$w.state.tmp" "$dir/$w.state"
echo "$outcome"
"""

#: run by the host's Python: `python - VENV WHEEL BUILD EXTRAS LOG` (paths from $HOME).
#: Makes the virtualenv VENV (once) and installs the wheel with EXTRAS (comma-separated)
#: there, under a lock, so workers bootstrapping at once on a host install once; then removes
#: the wheel's folder. Exit status 3: no virtualenv; 4: pip failed. VENV/jobfleet-build
#: records the build and the extras installed.
INSTALL = r"""
import fcntl, os, shutil, subprocess, sys, time

os.chdir(os.path.expanduser("~"))
venv, wheel, build, extras, log = sys.argv[1:6]
out = open(log, "a", buffering=1)
os.dup2(out.fileno(), 1)
os.dup2(out.fileno(), 2)


def say(text):
    print(time.strftime("%Y-%m-%d %H:%M:%S"), text, flush=True)


def shown(path):
    return path if os.path.isabs(path) else "~/" + path


def install():
    wanted = set(filter(None, extras.split(",")))
    stamp = os.path.join(venv, "jobfleet-build")
    try:
        with open(stamp) as f:
            have = f.read().split()
    except OSError:
        have = []
    if have[:1] == [build] and wanted <= set(have[1:]):
        say(f"jobfleet (build {build}) is already installed in {shown(venv)}")
        return 0
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        say(f"creating the virtualenv {shown(venv)}")
        made = subprocess.run([sys.executable, "-m", "venv", venv], stdin=subprocess.DEVNULL)
        if made.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            say(f"{sys.executable} -m venv failed (exit status {made.returncode})")
            return 3
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    say(f"installing jobfleet (build {build}) into {shown(venv)}")
    target = wheel + ("[" + ",".join(sorted(wanted)) + "]" if wanted else "")
    for step in (pip + ["--no-deps", "--force-reinstall", wheel], pip + [target]):
        if subprocess.run(step, stdin=subprocess.DEVNULL).returncode != 0:
            say("pip failed: " + " ".join(step))
            return 4
    if have[:1] == [build]:
        wanted |= set(have[1:])
    with open(stamp + ".tmp", "w") as f:
        f.write(" ".join([build, *sorted(wanted)]) + "\n")
    os.replace(stamp + ".tmp", stamp)
    say("jobfleet installed")
    return 0


os.makedirs(os.path.dirname(venv) or ".", exist_ok=True)
try:
    with open(venv + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        status = install()
finally:
    shutil.rmtree(os.path.dirname(wheel), ignore_errors=True)
sys.exit(status)
"""
