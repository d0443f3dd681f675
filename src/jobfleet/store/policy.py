"""Retry policy: what state a job goes to after an attempt ends, shared by every store."""

from __future__ import annotations

import random

from jobfleet.store.base import CANCELLED, FAILED, MAX_BACKOFF, QUEUED, STALLED

__all__ = ["SANDBOX_ERROR", "STALLED", "after_attempt", "backoff", "stall_event", "uncounted"]

#: attempt outcomes that may be retried
_RETRYABLE = frozenset({"failed", "lost"})
#: a failure of the sandbox, not of the job: the reason starts with this
SANDBOX_ERROR = "sandbox error"
#: sandbox errors after a job's first that do not use up its attempts; past these they do, so a
#: broken machine cannot retry a job for ever
FREE_SANDBOX_ERRORS = 5


def stall_event(quiet_for: float | None) -> tuple[str, dict[str, object]]:
    """The event recording that an attempt stalled (quiet for so long), or moves again."""
    if quiet_for is None:
        return "progressing", {}
    return "stalled", {"quiet_for": round(quiet_for, 1)}


def uncounted(status: str, reason: str | None, earlier_sandbox_errors: int) -> bool:
    """Whether this attempt is a repeated sandbox error that does not use up an attempt: the
    sandbox failing again says nothing new about the job."""
    return (status == "failed" and (reason or "").startswith(SANDBOX_ERROR)
            and 0 < earlier_sandbox_errors <= FREE_SANDBOX_ERRORS)


def backoff(retry_delay: float, used: int) -> float:
    """Seconds to wait before attempt `used + 1`: doubling from `retry_delay`, capped, jittered.

    The jitter keeps the upper half of the window ("equal jitter"), so a fleet of failing jobs
    spreads out without any of them retrying much sooner than asked.
    """
    if retry_delay <= 0:
        return 0.0
    delay = min(MAX_BACKOFF, retry_delay * 2.0 ** max(0, used - 1))
    return delay * random.uniform(0.5, 1.0)


def after_attempt(
    status: str,
    *,
    exit_code: int | None,
    used: int,
    max_attempts: int,
    retry_on: str | None,
    retry_delay: float,
    cancel_requested: bool,
    now: float,
) -> tuple[str, float]:
    """The job's next (state, not_before) after an attempt ended with `status`.

    `status` is an Outcome status or `lost` (lease expired). `used` counts attempts against
    the budget, this one included. `retry_on` limits retries of non-zero exits to those codes;
    a lost worker, a timeout or a signal is always worth another try.
    """
    if status not in _RETRYABLE:
        return status, 0.0
    if cancel_requested:
        return CANCELLED, 0.0
    if exit_code is not None and retry_on and str(exit_code) not in retry_on.split(","):
        return FAILED, 0.0
    if used < max_attempts:
        return QUEUED, now + backoff(retry_delay, used)
    return FAILED, 0.0


def ended_event(status: str, state: str, not_before: float, *, attempt: int,
                exit_code: int | None, signal: int | None,
                reason: str | None) -> tuple[str, dict[str, object]]:
    """The event that records how an attempt ended and what became of its job: kind, detail."""
    detail: dict[str, object] = {"attempt": attempt, "then": state}
    if exit_code is not None:
        detail["exit_code"] = exit_code
    if signal is not None:
        detail["signal"] = signal
    if reason:
        detail["reason"] = reason
    if state == QUEUED and status != "released":
        detail["retry_at"] = round(not_before, 3)
    return ("lease_expired" if status == "lost" else status), detail
