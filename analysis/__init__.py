"""Pure analysis (numpy + stdlib): the run store, anomaly detectors, trends, checkpoint health, reward
reliability and the report. Shared by the training-side callback and the monitor; no torch at import time.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "CheckpointAnalyzer": "rlhf_tui.analysis.checkpoint",
    "RewardModelIntegrator": "rlhf_tui.analysis.rewards",
    "Thresholds": "rlhf_tui.analysis.thresholds",
    "Store": "rlhf_tui.analysis.store",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rlhf_tui.analysis' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
