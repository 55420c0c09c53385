"""The model's context against prompt + completion length: GRPO/RLOO generate `max_completion_length` tokens
after each whole prompt (TRL 1.x does not truncate prompts), and a sequence longer than the model's position
table dies deep inside generation (`IndexError: index out of range in self` for GPT-2).
`fitted_completion_length` shortens the completions to what the longest prompt leaves (one warning) or refuses
in one line."""

from __future__ import annotations

import itertools
import logging
import os
import warnings
from typing import Any

from rlhf_tui.bridge.training.integration.errors import IntegrationError, TRLMappingWarning

log = logging.getLogger("rlhf_tui.bridge.training.integration")

# Where configs keep their context length, in the order transformers models use them.
CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
MAX_MEASURED = 20_000  # prompts measured per dataset (the first ones): seconds for a fast tokenizer
MAX_MEASURED_STREAMED = 1_000  # an IterableDataset is read (perhaps streamed) to measure it
CHUNK = 1_000


def model_context(model: Any) -> tuple[int, str] | None:
    """(context length, the config attribute it came from) of a model, hub id or local folder; None when it
    cannot be told (no config, or one that names no context length)."""
    config = getattr(model, "config", None)
    if config is None and isinstance(model, (str, os.PathLike)):
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(os.fspath(model))
        except Exception:  # the trainer reports a model it cannot load; this check only skips
            return None
    if config is None:
        return None
    try:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
    except Exception:
        text = config
    for attr in CONTEXT_ATTRS:
        value = getattr(text, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, attr
    return None


def longest_prompt(dataset: Any, tokenizer: Any) -> tuple[int, int] | None:
    """(tokens, row) of the longest prompt among the first MAX_MEASURED of `dataset`, tokenized as GRPO does
    (text prompts with the tokenizer, conversations with the chat template and the generation prompt); None
    when they cannot be measured (no `prompt` column, no chat template, a processor that does not tokenize)."""
    try:
        prompts = _first_prompts(dataset)
        best: tuple[int, int] | None = None
        for start in range(0, len(prompts), CHUNK):
            for offset, ids in enumerate(_token_ids(tokenizer, prompts[start : start + CHUNK])):
                if best is None or len(ids) > best[0]:
                    best = (len(ids), start + offset)
        return best
    except Exception as exc:  # measuring is a courtesy: the trainer still runs (and fails in its own words)
        log.info("rlhf-tui: prompt lengths not measured (%s: %s)", type(exc).__name__, exc)
        return None


def _first_prompts(dataset: Any) -> list:
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        return [row["prompt"] for row in itertools.islice(dataset, MAX_MEASURED_STREAMED)]
    return list(dataset[: min(len(dataset), MAX_MEASURED)]["prompt"])


def _token_ids(tokenizer: Any, prompts: list) -> list:
    if prompts and not isinstance(prompts[0], str):  # conversations: [{"role": ..., "content": ...}, ...]
        out = tokenizer.apply_chat_template(
            conversation=prompts, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(out["input_ids"])
    return list(tokenizer(text=prompts)["input_ids"])


def fitted_completion_length(completion: int, model: Any, tokenizer: Any, named_datasets: dict[str, Any]) -> int | None:
    """The completion length that makes prompt + completion fit the model: lower than `completion` when the
    longest prompt leaves less room (one TRLMappingWarning), None when `completion` fits or the context is
    unknown; IntegrationError (one line) when a prompt alone fills the context."""
    found = model_context(model)
    if found is None or not isinstance(completion, int):
        return None
    context, attr = found
    longest: tuple[int, int, str] | None = None
    for name, dataset in named_datasets.items():
        if dataset is None:
            continue
        measured = longest_prompt(dataset, tokenizer)
        if measured is not None and (longest is None or measured[0] > longest[0]):
            longest = (*measured, name)
    if longest is None:  # prompts unknown: only a completion that alone overflows can be caught
        if completion < context:
            return None
        raise IntegrationError(
            f"max_completion_length={completion} does not fit the model's context ({attr}={context}) with any "
            f"prompt: set max_completion_length below {context}"
        )
    tokens, row, name = longest
    if tokens + completion <= context:
        return None
    room = context - tokens
    if room < 1:
        raise IntegrationError(
            f"prompt {row} of the {name} dataset is {tokens} tokens, which fills the model's context "
            f"({attr}={context}) before any completion: shorten or drop the longest prompts (document columns are "
            "cut to text_prompt_words words), or use a model with a longer context"
        )
    warnings.warn(
        f"TRLIntegrationConfig: the longest prompt ({tokens} tokens, row {row} of the {name} dataset) + "
        f"max_completion_length={completion} exceed the model's context ({attr}={context}); completions are "
        f"limited to {room} tokens for this run",
        TRLMappingWarning,
        stacklevel=3,  # the caller of setup_trl_trainer
    )
    return room
