"""A tiny GPT-2 and tokenizer built locally (no download), for the demo, the examples and the tests.

`build_tiny_model(path)` builds a small word-level tokenizer with `tokenizers`, builds a GPT2Config model and saves
both with `save_pretrained`, so TRL can rebuild the reference model from the path. Cached: a folder that
already holds a complete model is reused.
"""

from __future__ import annotations

import os
from pathlib import Path

PROMPTS = [
    "The weather today is",
    "My favourite food is",
    "Once upon a time there was",
    "The best way to learn is",
    "In the morning I like to",
    "The movie was",
    "A good friend always",
    "The city at night looks",
    "When I was young I",
    "The secret of happiness is",
    "Yesterday the team",
    "The old house on the hill",
    "Every summer we go to",
    "The scientist discovered",
    "My dog likes to",
    "The book I read was",
]
CORPUS = [
    "the weather today is sunny and warm and everyone is happy",
    "my favourite food is pizza with cheese and tomato",
    "once upon a time there was a small cat who loved to play",
    "the best way to learn is to practise every day with joy",
    "the movie was great and the music was wonderful",
    "a good friend always helps you when you are sad",
    "the city at night looks bright and beautiful",
    "the secret of happiness is to be kind and grateful",
    "the scientist discovered a new star in the sky",
    "my dog likes to run in the park and chase the ball",
    "good great happy joy love wonderful excellent bad sad terrible awful",
] * 4


def default_cache_dir() -> Path:
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("rlhf-tui"))
    except Exception:
        return Path.home() / ".cache" / "rlhf-tui"


def build_tiny_model(
    path: str | os.PathLike | None = None, *, n_layer: int = 2, n_embd: int = 64, seed: int = 0
) -> str:
    """Build (once) and save a tiny GPT-2 + tokenizer; returns the folder path."""
    path = Path(path) if path is not None else default_cache_dir() / "tiny-gpt2-words"
    if (
        (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
        and (path / "tokenizer.json").is_file()
    ):
        return str(path)
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    # A word-level vocabulary: generations are (random, then learned) words rather than byte soup, so the
    # demo's sample completions read like text and the word-based demo reward has something to learn.
    words = sorted({w for line in CORPUS + PROMPTS for w in line.lower().split()})
    vocab = {tok: i for i, tok in enumerate(["<eos>", "<unk>", "<pad>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>", bos_token="<eos>"
    )
    fast.padding_side = "left"
    config = GPT2Config(
        vocab_size=len(fast),
        n_positions=128,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=fast.eos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    fast.save_pretrained(tmp)
    if path.exists():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # atomic: a concurrent build never sees half a model
    return str(path)


def prompt_dataset(n: int = 64):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(n)]})


def length_reward(completions, **kwargs):
    """Demo reward: one point per positive word, minus the distance from 12 characters (cheap, deterministic)."""
    good = ("good", "great", "happy", "joy", "love", "wonderful", "excellent")
    out = []
    for c in completions:
        text = c if isinstance(c, str) else str(c)
        score = -abs(len(text) - 12) / 12.0 + sum(w in text for w in good)
        out.append(float(score))
    return out


def quiet_libraries() -> None:
    """Keep a demo or example's terminal readable: no progress bars, FutureWarnings or info logs from
    transformers/datasets (their errors still show)."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
