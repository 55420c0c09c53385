"""Training side of rlhf-tui: the callback, reward wrapper, publisher, JSONL log, and the subscriber.

Importing this package is light: the callback (which imports transformers) loads on first access.
"""
from __future__ import annotations

from typing import Any

_LAZY = {
    "RLHFMonitorCallback": "rlhf_tui.bridge.callback",
    "PPOMonitoringCallback": "rlhf_tui.bridge.callback",
    "monitor_rewards": "rlhf_tui.bridge.rewards",
    "TRLIntegrationConfig": "rlhf_tui.bridge.integration",
    "TRLIntegrationManager": "rlhf_tui.bridge.integration",
    "Subscriber": "rlhf_tui.bridge.subscriber",
    "Publisher": "rlhf_tui.bridge.publisher",
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
