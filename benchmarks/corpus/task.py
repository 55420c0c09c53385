"""The corpus's task: a tiny LLaMA doing arithmetic with `<answer>…</answer>` formatting.

Everything is built locally (no download):

* `build_tokenizer()`: a character-level tokenizer (`tokenizers` WordLevel over the task's alphabet, with
  `<answer>` and `</answer>` as single tokens), decoded without spaces;
* `build_base_model(path)`: a `LlamaForCausalLM` from a config (hidden 48, 2 layers, 4 heads), briefly trained
  with a plain supervised loop on noisy arithmetic completions (some wrong sums, some broken tags) so the RL
  runs start from a policy that is partly right and partly badly formatted, then saved with `save_pretrained`;
* the data sets (`prompt_dataset`, `preference_dataset`) and the three reward functions (`correctness`,
  `format_ok`, `length_ok`), which read the `answer` column TRL passes to reward functions.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
SPECIALS = ["<pad>", "<eos>", "<unk>"]
ALPHABET = list("0123456789+-= ")
MAX_OPERAND = 19
MODEL_SHAPE = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}
_ANSWER_RE = re.compile(r"<answer>\s*(-?\d+)\s*</answer>")
_STRICT_RE = re.compile(r"^<answer>-?\d+</answer>$")


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, ANSWER_OPEN, ANSWER_CLOSE, *ALPHABET])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"</answer>|<answer>|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>", bos_token="<eos>"
    )
    fast.padding_side = "left"
    return fast


def make_problem(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    if rng.random() < 0.5:
        return f"{a}+{b}=", a + b
    a, b = max(a, b), min(a, b)
    return f"{a}-{b}=", a - b


def formatted(answer: int) -> str:
    return f"{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def _noisy_target(rng: random.Random, answer: int) -> str:
    """A supervised target: mostly right and well formatted, with the mistakes RL then has to remove."""
    if rng.random() < 0.35:
        answer += rng.choice([-2, -1, 1, 2, 10, -10])
    roll = rng.random()
    if roll < 0.15:
        return str(answer)
    if roll < 0.25:
        return f"{ANSWER_OPEN}{answer}"
    if roll < 0.32:
        return f"{ANSWER_OPEN}{answer} {answer}{ANSWER_CLOSE}"
    if roll < 0.40:
        return f"{formatted(answer)} {answer}"
    if roll < 0.45:
        return formatted(answer) * 2
    return formatted(answer)


def build_base_model(path: str | Path, *, seed: int = 1234, sft_steps: int = 2500) -> str:
    """Build, briefly pre-train and save the tiny LLaMA + tokenizer under `path`; returns the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return str(path)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **MODEL_SHAPE,
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(sft_steps):
        rows, masks = [], []
        for _ in range(32):
            prompt, answer = make_problem(rng)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            c_ids = tok(_noisy_target(rng, answer), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append(p_ids + c_ids)
            masks.append([0] * len(p_ids) + [1] * len(c_ids))
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, m) in enumerate(zip(rows, masks)):
            ids[i, : len(r)] = torch.tensor(r)
            attn[i, : len(r)] = 1
            labels[i, : len(r)] = torch.where(torch.tensor(m) == 1, torch.tensor(r), torch.tensor(-100))
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # atomic: an interrupted build never leaves a half-written model behind
    return str(path)


def prompt_dataset(seed: int, n: int = 4096):
    from datasets import Dataset

    rng = random.Random(seed)
    prompts, answers = zip(*(make_problem(rng) for _ in range(n)))
    return Dataset.from_dict({"prompt": list(prompts), "answer": [str(a) for a in answers]})


def preference_dataset(seed: int, n: int = 4096):
    """Pairs from the same task: the correct formatted answer vs a wrong or badly formatted one."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        prompt, answer = make_problem(rng)
        if rng.random() < 0.6:
            rejected = formatted(answer + rng.choice([-3, -2, -1, 1, 2, 3, 10]))
        else:
            rejected = rng.choice([str(answer), f"{ANSWER_OPEN}{answer}", f"{answer} {answer}"])
        rows["prompt"].append(prompt)
        rows["chosen"].append(formatted(answer))
        rows["rejected"].append(rejected)
    return Dataset.from_dict(rows)


def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[0], dict):
        return str(completion[0].get("content", ""))
    return str(completion)


def correctness(completions, answer, **kwargs) -> list[float]:
    """1 when the number inside the first `<answer>…</answer>` is the right result, else 0."""
    out = []
    for c, a in zip(completions, answer):
        m = _ANSWER_RE.search(_text(c))
        out.append(1.0 if m and m.group(1) == str(a) else 0.0)
    return out


def format_ok(completions, **kwargs) -> list[float]:
    """1 for exactly `<answer>N</answer>`, 0.5 when both tags are there with extra text, else 0."""
    out = []
    for c in completions:
        text = _text(c).strip()
        if _STRICT_RE.match(text):
            out.append(1.0)
        elif ANSWER_OPEN in text and ANSWER_CLOSE in text:
            out.append(0.5)
        else:
            out.append(0.0)
    return out


def length_ok(completions, answer, **kwargs) -> list[float]:
    """1 at the length of the ideal completion, falling linearly to 0 at twice that distance (characters)."""
    out = []
    for c, a in zip(completions, answer):
        ideal = len(formatted(int(a)))
        out.append(max(0.0, 1.0 - abs(len(_text(c)) - ideal) / ideal))
    return out


REWARDS = {"correctness": correctness, "format_ok": format_ok, "length_ok": length_ok}
