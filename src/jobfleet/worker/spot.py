"""Spot interruption notices: a thread that watches EC2's instance metadata and, when the
instance is about to be reclaimed, tells the worker to hand its jobs back at once.

EC2 announces a reclaim about two minutes ahead at `/latest/meta-data/spot/instance-action`
(404 until then; then `{"action": "terminate", "time": "..."}`). The watcher asks with an
IMDSv2 session token. A rebalance recommendation (`events/recommendations/rebalance`) is only
an early hint that the instance is at risk; it is logged, and the worker goes on.

`JOBFLEET_IMDS_URL` points at another metadata service (a local stand-in in tests);
`JOBFLEET_SPOT_POLL` is the seconds between looks (default 2).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping

log = logging.getLogger("jobfleet.worker")

IMDS_URL = "http://169.254.169.254"
POLL = 2.0
#: how long an IMDSv2 token lives (seconds); it is renewed well before
TOKEN_TTL = 21600
_TIMEOUT = 1.0


def notice_reason(body: bytes) -> str:
    """The interruption reason recorded on the attempts, from an instance-action answer."""
    try:
        notice = json.loads(body)
    except ValueError:
        notice = {}
    action = notice.get("action", "terminate") if isinstance(notice, dict) else "terminate"
    when = notice.get("time") if isinstance(notice, dict) else None
    return f"interrupted: spot instance reclaimed ({action}" + (f" at {when})" if when else ")")


class SpotWatcher:
    """Polls the instance metadata for a spot interruption notice; calls `on_notice(reason)`
    once when one comes, then stops."""

    def __init__(self, on_notice: Callable[[str], None],
                 env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.on_notice = on_notice
        self.base = (env.get("JOBFLEET_IMDS_URL") or IMDS_URL).rstrip("/")
        self.interval = float(env.get("JOBFLEET_SPOT_POLL") or POLL)
        self._token: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spot-watch", daemon=True)
        self._unreachable_said = False
        self._rebalance_said = False
        self.notice: str | None = None

    def start(self) -> SpotWatcher:
        log.info("watching %s for spot interruption notices every %gs", self.base,
                 self.interval, extra={"action": "spot_watch"})
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 2 * _TIMEOUT)

    def _run(self) -> None:
        while not self._stop.is_set():
            reason = self.check()
            if reason is not None:
                self.notice = reason
                log.warning("spot interruption notice: %s; handing jobs back", reason,
                            extra={"action": "spot_interrupted"})
                self.on_notice(reason)
                return
            self._stop.wait(self.interval)

    # -- one look -----------------------------------------------------------------------------
    def check(self) -> str | None:
        """The interruption reason if a notice is out, else None (also when the metadata
        service cannot be reached: that is said once in the log)."""
        try:
            status, body = self._get("/latest/meta-data/spot/instance-action")
            if status == 200:
                return notice_reason(body)
            status, body = self._get("/latest/meta-data/events/recommendations/rebalance")
            if status == 200 and not self._rebalance_said:
                self._rebalance_said = True
                log.warning("EC2 recommends rebalancing (%s): this spot instance is at risk of"
                            " being reclaimed; jobs go on until a notice comes",
                            body.decode(errors="replace").strip(),
                            extra={"action": "spot_rebalance"})
        except OSError as e:
            if not self._unreachable_said:
                self._unreachable_said = True
                log.warning("instance metadata at %s cannot be reached (%s): no spot notice"
                            " will be seen", self.base, e, extra={"action": "spot_watch"})
        return None

    def _get(self, path: str) -> tuple[int, bytes]:
        """GET a metadata path with a session token (renewed when refused)."""
        for _ in range(2):
            headers = {"X-aws-ec2-metadata-token": self._token} if self._token else {}
            if not self._token:
                headers = self._new_token()
            request = urllib.request.Request(self.base + path, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=_TIMEOUT) as answer:
                    return answer.status, answer.read()
            except urllib.error.HTTPError as e:
                if e.code == 401:  # the token expired: get a new one and ask again
                    self._token = None
                    continue
                return e.code, b""
        return 401, b""

    def _new_token(self) -> dict[str, str]:
        """An IMDSv2 session token's header (none where the service only speaks IMDSv1)."""
        request = urllib.request.Request(
            self.base + "/latest/api/token", method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL)})
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT) as answer:
                self._token = answer.read().decode().strip()
        except urllib.error.HTTPError:
            return {}  # IMDSv1 only
        return {"X-aws-ec2-metadata-token": self._token}
