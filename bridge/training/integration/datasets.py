"""Prompt data sets for the manager: a `datasets.Dataset` with a `prompt` column from a hub id, a local file or
folder, a Dataset or a list, with clear errors for what cannot be loaded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rlhf_tui.bridge.training.integration.errors import DatasetSourceError, first_line

DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Columns turned into prompts when a dataset has no `prompt` column: prompt-like ones are used whole,
# documents (e.g. IMDb reviews) are cut to their first words, as TRL's old IMDb PPO example did.
PROMPT_LIKE_COLUMNS = ("query", "question", "instruction", "input")
DOCUMENT_COLUMNS = ("text", "content", "review", "sentence", "document")
TEXT_PROMPT_WORDS = 8


def load_prompt_dataset(source: Any, split: str = "train", text_prompt_words: int | None = TEXT_PROMPT_WORDS):
    """A `datasets.Dataset` with a `prompt` column from: a Dataset/DatasetDict, a list of strings or dicts, a
    local .json/.jsonl/.csv/.parquet file, a `save_to_disk` folder, a folder of data files, or a hub id.

    Without a `prompt` column, the first of query/question/instruction/input is used whole, or the first of
    text/content/review/sentence/document is cut to its first `text_prompt_words` words.
    """
    import datasets

    dataset = source
    if isinstance(source, (str, os.PathLike)):
        dataset = _load_dataset_source(os.fspath(source), split)
    elif isinstance(source, (list, tuple)):
        if not source:
            raise DatasetSourceError("the dataset list is empty")
        rows = [{"prompt": s} if isinstance(s, str) else dict(s) for s in source]
        dataset = datasets.Dataset.from_list(rows)
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in dataset:
            raise DatasetSourceError(f"the dataset has no split {split!r} (it has {', '.join(dataset)})")
        dataset = dataset[split]
    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise DatasetSourceError(
            f"cannot use {type(source).__name__} as a dataset: pass a hub id, a local "
            ".json/.jsonl/.csv/.parquet file, a save_to_disk folder or a datasets.Dataset"
        )
    return _with_prompts(dataset, text_prompt_words)


def _load_dataset_source(name: str, split: str):
    import datasets

    path = Path(name).expanduser()
    if path.is_file():
        kind = DATA_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise DatasetSourceError(f"{name}: unsupported data file (use .json, .jsonl, .csv or .parquet)")
        try:
            return datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as exc:
            raise DatasetSourceError(f"{name}: cannot read as {kind}: {first_line(exc)}") from exc
    if path.is_dir():
        if (
            (path / "dataset_info.json").is_file()
            or (path / "dataset_dict.json").is_file()
            or (path / "state.json").is_file()
        ):
            try:
                return datasets.load_from_disk(str(path))
            except Exception as exc:
                raise DatasetSourceError(f"{name}: not a readable save_to_disk folder: {first_line(exc)}") from exc
        try:
            return datasets.load_dataset(str(path), split=split)
        except Exception as exc:
            raise DatasetSourceError(f"{name}: no data files datasets can read: {first_line(exc)}") from exc
    if name.startswith((".", "/", "~")) or Path(name).suffix.lower() in DATA_SUFFIXES:
        raise DatasetSourceError(f"dataset file or folder not found: {name}")
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise DatasetSourceError(
            f"cannot load dataset {name!r} from the Hugging Face Hub{hint}: {first_line(exc)}. Offline, pass a "
            "local .json/.jsonl/.csv/.parquet file, a save_to_disk folder or a datasets.Dataset"
        ) from exc


def _with_prompts(dataset, words: int | None):
    columns = list(dataset.column_names or [])
    if "prompt" in columns:
        return dataset
    features = getattr(dataset, "features", None) or {}

    def is_text(col: str) -> bool:
        feature = features.get(col)
        return getattr(feature, "dtype", None) in ("string", "large_string")

    column = next((c for c in PROMPT_LIKE_COLUMNS if c in columns and is_text(c)), None)
    cut = None
    if column is None:
        column = next((c for c in DOCUMENT_COLUMNS if c in columns and is_text(c)), None)
        if column is None:
            column = next((c for c in columns if is_text(c)), None)
        cut = words
    if column is None:
        raise DatasetSourceError(
            f"the dataset has no 'prompt' column and no text column to make prompts from "
            f"(columns: {', '.join(columns) or 'none'})"
        )

    def to_prompt(row):
        text = row[column] or ""
        return {"prompt": " ".join(text.split()[:cut]) if cut else text}

    return dataset.map(to_prompt)
