"""What every request of one dashboard shares: the store, the blobs, the token and the caches."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from jobfleet.blobs import Blobs
from jobfleet.dashboard.access import StorePerThread, Token
from jobfleet.dashboard.metrics import Metrics
from jobfleet.dashboard.views import RunViews


@dataclass(frozen=True, slots=True)
class Context:
    stores: StorePerThread
    blobs: Blobs
    token: Token
    run_views: RunViews
    metrics: Metrics


def context(request: Request) -> Context:
    """The dashboard's Context (a FastAPI dependency)."""
    ctx: Context = request.app.state.jobfleet
    return ctx
