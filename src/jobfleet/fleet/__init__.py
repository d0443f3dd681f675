"""Fleets: providers that start workers where the user says, and the autoscaler that sizes
them to the queue. Providers are imported by name, when chosen."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from jobfleet.errors import ConfigError
from jobfleet.fleet.base import (
    BOOTSTRAPPING,
    FAILED,
    LAUNCHING,
    LIVE,
    PHASES,
    READY,
    STOPPED,
    LaunchSpec,
    Machine,
    OnChange,
    Provider,
)

#: provider name -> module:class
PROVIDERS = {
    "local": "jobfleet.fleet.local:LocalProvider",
    "ssh": "jobfleet.fleet.ssh:SshProvider",
    "slurm": "jobfleet.fleet.slurm:SlurmProvider",
    "aws": "jobfleet.fleet.aws:AwsProvider",
    "kubernetes": "jobfleet.fleet.kubernetes:KubernetesProvider",
}


def provider_named(name: str, fleet: str, settings: Mapping[str, object] | None = None,
                   on_change: OnChange | None = None) -> Provider:
    """The provider called `name`, its settings checked (ConfigError when one is bad)."""
    if name not in PROVIDERS:
        raise ConfigError(f"unknown provider {name!r}",
                          hint=f"providers are: {', '.join(PROVIDERS)}")
    module, cls = PROVIDERS[name].split(":")
    provider: type[Provider] = getattr(importlib.import_module(module), cls)
    return provider(fleet, settings or {}, on_change)


__all__ = ["BOOTSTRAPPING", "FAILED", "LAUNCHING", "LIVE", "PHASES", "PROVIDERS", "READY",
           "STOPPED", "LaunchSpec", "Machine", "OnChange", "Provider", "provider_named"]
