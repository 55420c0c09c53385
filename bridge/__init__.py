"""rlhf-tui's two ends of the wire: `wire` (what both agree on), `training` (the callback side) and `monitor`
(the subscriber side). Importing this package is light: the callback (which imports transformers) loads on first
access."""

from __future__ import annotations

from typing import Any

_LAZY = {
    "RLHFMonitorCallback": "rlhf_tui.bridge.training.callback",
    "PPOMonitoringCallback": "rlhf_tui.bridge.training.callback",
    "monitor_rewards": "rlhf_tui.bridge.training.rewards",
    "TRLIntegrationConfig": "rlhf_tui.bridge.training.integration",
    "TRLIntegrationManager": "rlhf_tui.bridge.training.integration",
    "Subscriber": "rlhf_tui.bridge.monitor.subscriber",
    "Publisher": "rlhf_tui.bridge.training.publisher",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rlhf_tui.bridge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
