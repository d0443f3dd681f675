"""The dashboard: live pages, a JSON API and Prometheus metrics over one store (`jobfleet dashboard`).

Needs the `dashboard` extra (FastAPI, uvicorn, Jinja2); nothing here is imported by the other
commands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobfleet.dashboard.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from jobfleet.dashboard.app import create_app

        return create_app
    raise AttributeError(name)
