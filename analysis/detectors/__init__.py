"""Anomaly detectors for RLHF training metrics, one engine: `detect` / `evaluate` over a whole history.

Every detector compares a metric with its own trailing baseline (blocks of `block_steps` rows before the current
block, so the current point is never part of it) or with the run's own early level, so the rules are unit-free.
Isolated one-step spikes are low severity; medium and above need persistence (CUSUM evidence or k of the last n
steps) or a rule that is exact (non-finite values, reward identity, memory near OOM). A detector is one record
in `registry.py` plus one rule in `rules.py`.
"""

from rlhf_tui.analysis.detectors.engine import DetectionCache, detect, evaluate
from rlhf_tui.analysis.detectors.plan import band_metrics, generic_metrics, zscore_band
from rlhf_tui.analysis.detectors.registry import DETECTORS, REGISTRY, Detector, setting_of
from rlhf_tui.analysis.severity import SEVERITIES, Severity

severity_at_least = Severity.at_least

__all__ = [
    "DETECTORS",
    "REGISTRY",
    "SEVERITIES",
    "DetectionCache",
    "Detector",
    "Severity",
    "detect",
    "evaluate",
    "band_metrics",
    "generic_metrics",
    "setting_of",
    "severity_at_least",
    "zscore_band",
]
