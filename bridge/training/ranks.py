"""Which process of the job this is (rank, world size), and the run token the main process shares with the
others so that it takes their forwards (run_token.py; docs/security.md, "Forwarded samples")."""

from __future__ import annotations

import os
import warnings
from typing import Any

from rlhf_tui.bridge.training import run_token
from rlhf_tui.bridge.training.forwarder import forward_address
from rlhf_tui.bridge.training.publisher import resolve_address
from rlhf_tui.bridge.training.run_meta import hostname

_warned_all_ranks = False  # publish_all_ranks=True is warned about once per process


def warn_all_ranks() -> None:
    global _warned_all_ranks
    if _warned_all_ranks:
        return
    _warned_all_ranks = True
    warnings.warn(
        "rlhf-tui: publish_all_ranks is ignored: every rank's system samples and reward batches reach the monitor "
        "through the main process's one address (forward_ranks=True, the default).",
        RuntimeWarning,
        stacklevel=3,
    )


def process_rank(args: Any, state: Any) -> tuple[bool, int, dict[str, Any]]:
    """(is the main process, rank, the rank fields of its system samples), from on_train_begin's arguments."""
    rank = int(getattr(args, "process_index", 0) or 0)
    is_main = bool(getattr(state, "is_world_process_zero", True)) and rank <= 0
    info = {
        "rank": rank,
        "local_rank": int(getattr(args, "local_process_index", 0) or 0),
        "hostname": hostname(),
    }
    return is_main, rank, info


def arg_world_size(args: Any) -> int | None:
    world = getattr(args, "world_size", None)
    return world if type(world) is int and world >= 1 else None


def env_world_size() -> int | None:
    """WORLD_SIZE as torchrun/accelerate set it (a custom loop has no TrainingArguments), or None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", ""))
    except ValueError:
        return None
    return world if world >= 1 else None


def share_run_token(address: Any, curve: Any, world_size: int | None) -> tuple[str | None, tuple[Any, str] | None]:
    """(the token the other ranks of this job forward their samples with, the file written for ranks on this
    node or None): no file where the environment or CURVE gives it to every rank. No token: forwards are
    refused (a single-process job, no socket, or a token that cannot be shared: warned)."""
    if address is False or world_size == 1:
        return None, None
    try:
        token = run_token.main_token(curve)
        if run_token.shared_without_file(curve):
            return token, None
        return token, (run_token.write_token(forward_address(resolve_address(address)), token), token)
    except (OSError, run_token.TokenError) as exc:
        warnings.warn(
            f"rlhf-tui: the run token cannot be shared with the other ranks ({exc}); their system samples are "
            f"refused. Give every rank the same {run_token.TOKEN_ENV}.",
            RuntimeWarning,
            stacklevel=4,
        )
        return None, None
