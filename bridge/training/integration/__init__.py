"""The seed's TRL integration on today's TRL: `TRLIntegrationConfig` (config.py), `TRLIntegrationManager`
(manager.py), prompt data sets, the phase profiler, results and PPO support, one module each. Every name keeps
its import place here, and the seed's callback and analyser names import from here as from
`rlhf_core.trl_integration`."""

from __future__ import annotations

from typing import Any

from rlhf_tui.bridge.training.integration.config import (
    MAPPING,
    REPORTERS,
    TRLIntegrationConfig,
    available_reporters,
)
from rlhf_tui.bridge.training.integration.datasets import load_prompt_dataset
from rlhf_tui.bridge.training.integration.errors import (
    AlgorithmUnavailableError,
    DatasetSourceError,
    IntegrationError,
    TRLMappingWarning,
)
from rlhf_tui.bridge.training.integration.manager import TRLIntegrationManager, default_reward
from rlhf_tui.bridge.training.integration.ppo import ppo_support
from rlhf_tui.bridge.training.integration.profiling import PROFILE_KEYS, PhaseProfiler, format_profile
from rlhf_tui.bridge.training.integration.results import format_results

__all__ = [
    "TRLIntegrationConfig",
    "TRLIntegrationManager",
    "PhaseProfiler",
    "IntegrationError",
    "AlgorithmUnavailableError",
    "DatasetSourceError",
    "TRLMappingWarning",
    "default_reward",
    "load_prompt_dataset",
    "format_profile",
    "format_results",
    "ppo_support",
    "available_reporters",
    "MAPPING",
    "REPORTERS",
    "PROFILE_KEYS",
    # the seed's single import place (`rlhf_core.trl_integration`) had these too
    "PPOMonitoringCallback",
    "RLHFMonitorCallback",
    "CheckpointAnalyzer",
    "RewardModelIntegrator",
]

# Imported on first use: the callback needs transformers, the analysers numpy.
_REEXPORTS = {
    "PPOMonitoringCallback": "rlhf_tui.bridge.training.callback",
    "RLHFMonitorCallback": "rlhf_tui.bridge.training.callback",
    "CheckpointAnalyzer": "rlhf_tui.analysis.checkpoint",
    "RewardModelIntegrator": "rlhf_tui.analysis.rewards",
}


def __getattr__(name: str) -> Any:
    module = _REEXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
