"""The integration's errors and its one warning class: what a user asked for that cannot be set up, and seed
settings today's TRL cannot honour."""

from __future__ import annotations


class IntegrationError(RuntimeError):
    """Something the user asked for cannot be set up; the message says what and what to do instead."""


class AlgorithmUnavailableError(IntegrationError):
    """The requested algorithm does not exist in the installed TRL (e.g. PPO on TRL >= 1.13)."""


class DatasetSourceError(IntegrationError):
    """A dataset that cannot be loaded or has no column that can be turned into prompts."""


class TRLMappingWarning(UserWarning):
    """A seed setting that today's TRL cannot honour (ignored or changed); one warning per cause."""


def first_line(exc: BaseException) -> str:
    """The first line of an error, for one-line messages that name the cause."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
