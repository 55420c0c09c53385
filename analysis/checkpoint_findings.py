"""Checkpoint health findings: the thresholds, what kind each tensor is, the scale-aware checks over per-tensor
weight statistics and the 0..1 health score (the formula is in `checkpoint.py` and docs/checkpoint-health.md).
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Any

from .safetensors_io import FLOAT_DTYPES
from .severity import Severity

SEVERITY_FACTORS = {"low": 0.95, "medium": 0.80, "high": 0.60, "critical": 0.35}
CRITICAL_CAP = 0.5

# Thresholds. Wide on purpose: a pretrained model must pass, a broken one must not.
INIT_SCALE_TOLERANCE = 100.0  # RMS vs 1/sqrt(fan): flag beyond ×100 or below ×1/100
PEER_OUTLIER_FACTOR = 50.0  # RMS vs the median of tensors of the same kind
EXPLODING_RMS = 100.0  # any float tensor
EXPLODING_ABS = 1e4  # largest |value|; fp16 overflows at 65504
FP16_MAX = 65504.0
MEAN_SHIFT_RATIO = 5.0  # |mean| > 5·std in a weight matrix
DRIFT_OVERALL_HIGH = 0.5
DRIFT_OVERALL_LOW = 0.1
DRIFT_TENSOR_HIGH = 1.0
DRIFT_RMS_FLOOR = 0.01  # per-tensor drift is judged against max(reference RMS, this)
LR_HIGH = 1e-2

_NORM_RE = re.compile(r"norm|(?:^|[._])ln(?:\d|_|\.|$)")
_EMBED_RE = re.compile(
    r"embed|(?:^|\.)(?:wte|wpe|lm_head|shared|tok_embeddings|word_embeddings|"
    r"position_embeddings|embed_out)(?:\.|$)"
)
_ATTN_RE = re.compile(
    r"attn|attention|(?:^|\.)(?:q_proj|k_proj|v_proj|o_proj|qkv_proj|qkv|c_attn|query|key|value|"
    r"out_proj|wq|wk|wv|wo|query_key_value|in_proj)(?:\.|$)"
)
_MLP_RE = re.compile(
    r"mlp|ffn|feed_forward|experts|intermediate|(?:^|\.)(?:fc\d*|c_fc|up_proj|down_proj|"
    r"gate_proj|gate_up_proj|w1|w2|w3|dense_h_to_4h|dense_4h_to_h)(?:\.|$)"
)

RECOMMENDATIONS = {
    "unreadable": "Check the path, then re-save the checkpoint (model.save_pretrained) or resume from an earlier one.",
    "unsafe": "Only load checkpoints you trust: convert this file to safetensors in a trusted environment first.",
    "nonfinite": "Do not resume from this checkpoint: roll back to the last one without NaN/Inf, lower the learning "
    "rate, keep gradient clipping on (max_grad_norm) and prefer bf16 over fp16.",
    "all_zero": "Check how these tensors were initialised, loaded or saved: an all-zero weight usually means a "
    "failed load or an update that wiped it.",
    "constant": "A constant weight matrix has collapsed: compare with an earlier checkpoint and check the "
    "optimizer state for that parameter.",
    "exploding": "Weights are growing out of scale: lower the learning rate, keep gradient clipping on, add "
    "weight decay, and compare with an earlier checkpoint.",
    "vanishing": "Some tensors are far smaller than their peers: check weight decay and the learning-rate "
    "schedule, and compare with an earlier checkpoint.",
    "mean_shift": "A weight matrix is dominated by its mean: check for a stuck update direction (e.g. a bias "
    "folded into the weights or a broken optimizer state).",
    "drift": "The model moved far from the reference: raise the KL coefficient (beta), lower the learning rate, "
    "or roll back to an earlier checkpoint.",
    "structure": "The two checkpoints hold different tensors: compare checkpoints of the same architecture and "
    "the same PEFT configuration.",
    "learning_rate": "Check the learning-rate schedule: above 1e-2 is unusual when fine-tuning a language model.",
    "skipped": "Dequantize or convert these tensors to a float dtype to have them checked.",
    "incomplete": "The checkpoint is incomplete: re-save it, or check that the save finished before reading it.",
    "reference": "Check the --reference path: drift could not be computed.",
    "log": "Check that the log folder is writable.",
}


def classify_tensor(name: str, shape: tuple[int, ...] | list[int]) -> str:
    """Kind of a tensor from its name and shape: lora, norm, bias, embedding, attention, mlp or other."""
    lname = name.lower()
    ndim = len(shape)
    if "lora_" in lname:
        return "lora"
    if ndim <= 1 and _NORM_RE.search(lname):
        return "norm"
    if ndim <= 1 and lname.endswith("bias"):
        return "bias"
    if _EMBED_RE.search(lname):
        return "embedding"
    if _ATTN_RE.search(lname):
        return "attention"
    if _MLP_RE.search(lname):
        return "mlp"
    return "other"


def _is_weight_matrix(name: str, stats: dict[str, Any]) -> bool:
    return len(stats["shape"]) == 2 and name.endswith("weight") and stats["dtype"] in FLOAT_DTYPES


def _zero_by_design(name: str, kind: str) -> bool:
    lname = name.lower()
    # Biases and norm biases start at zero; PEFT starts lora_B at zero; Gemma-style norms store (weight − 1).
    return (
        kind == "bias"
        or (kind == "norm" and lname.endswith("bias"))
        or "lora_b" in lname
        or "lora_embedding_b" in lname
    )


class Findings:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(
        self, category: str, severity: str, message: str, tensor: str | None = None, value: float | None = None
    ) -> None:
        self.items.append(
            {"category": category, "severity": severity, "message": message, "tensor": tensor, "value": value}
        )


def fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.3g}"
    return str(x)


def list_names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def weight_findings(weight_stats: dict[str, dict[str, Any]], findings: Findings) -> None:
    n_float = sum(1 for s in weight_stats.values() if s["dtype"] in FLOAT_DTYPES)
    nan_tensors = [(n, s) for n, s in weight_stats.items() if s["nan_count"]]
    inf_tensors = [(n, s) for n, s in weight_stats.items() if s["inf_count"]]
    bad = {n for n, _ in nan_tensors} | {n for n, _ in inf_tensors}
    share = len(bad) / n_float if n_float else 0.0
    for label, hits, key in (("NaN", nan_tensors, "nan_count"), ("Inf", inf_tensors, "inf_count")):
        if hits:
            detail = [f"{n} ({s[key]} of {s['numel']} values)" for n, s in hits]
            findings.add(
                "nonfinite",
                "critical",
                f"{label} values in {len(hits)} tensor{'s' if len(hits) > 1 else ''}: {list_names(detail)}",
                tensor=hits[0][0],
                value=float(sum(s[key] for _, s in hits)),
            )
            findings.items[-1]["share"] = share

    zero, constant, exploding, vanishing, shifted, fp16 = [], [], [], [], [], []
    by_kind: dict[str, list[tuple[str, float]]] = {}
    for name, s in weight_stats.items():
        if s["dtype"] not in FLOAT_DTYPES or s["numel"] < 2 or s["rms"] is None:
            continue
        kind = s["kind"]
        if s["zero_fraction"] == 1.0:
            if not _zero_by_design(name, kind):
                zero.append(name)
            continue
        if s["min"] == s["max"] and s["numel"] >= 16 and kind not in ("norm", "bias"):
            constant.append((name, s["min"]))
        peak = max(abs(s["min"]), abs(s["max"]))
        if s["rms"] > EXPLODING_RMS or peak > EXPLODING_ABS:
            exploding.append((name, f"rms {fmt(s['rms'])}, largest |value| {fmt(peak)}", s["rms"]))
        if peak > FP16_MAX:
            fp16.append(name)
        if _is_weight_matrix(name, s) and not _zero_by_design(name, kind):
            d0, d1 = s["shape"]
            expected = 1.0 / math.sqrt(math.sqrt(d0 * d1))  # ~1/sqrt(fan_in) whatever the layout
            ratio = s["rms"] / expected
            if kind != "embedding" and ratio > INIT_SCALE_TOLERANCE and s["rms"] <= EXPLODING_RMS:
                exploding.append(
                    (name, f"rms {fmt(s['rms'])} is {ratio:.0f}× the ~1/sqrt(fan_in) scale {fmt(expected)}", s["rms"])
                )
            elif kind != "embedding" and ratio < 1.0 / INIT_SCALE_TOLERANCE:
                vanishing.append(
                    (name, f"rms {fmt(s['rms'])} is 1/{1 / ratio:.0f} of the ~1/sqrt(fan_in) scale {fmt(expected)}")
                )
            if (
                kind in ("attention", "mlp", "other")
                and s["numel"] >= 1024
                and s["std"] is not None
                and abs(s["mean"]) > MEAN_SHIFT_RATIO * s["std"]
            ):
                shifted.append((name, f"mean {fmt(s['mean'])}, std {fmt(s['std'])}"))
            by_kind.setdefault(kind, []).append((name, s["rms"]))

    # Peers: a tensor far from the median RMS of its kind in this very checkpoint.
    flagged = {n for n, _, _ in exploding} | {n for n, _ in vanishing}
    for kind, members in by_kind.items():
        if len(members) < 4:
            continue
        median = statistics.median(r for _, r in members)
        if median <= 0:
            continue
        for name, rms in members:
            if name in flagged:
                continue
            if rms > PEER_OUTLIER_FACTOR * median:
                exploding.append(
                    (
                        name,
                        f"rms {fmt(rms)} is {rms / median:.0f}× the median of {len(members)} "
                        f"{kind} tensors ({fmt(median)})",
                        rms,
                    )
                )
            elif rms < median / PEER_OUTLIER_FACTOR:
                vanishing.append(
                    (
                        name,
                        f"rms {fmt(rms)} is 1/{median / rms:.0f} of the median of "
                        f"{len(members)} {kind} tensors ({fmt(median)})",
                    )
                )

    if zero:
        norms = [n for n in zero if weight_stats[n]["kind"] == "norm"]
        others = [n for n in zero if n not in norms]
        if others:
            findings.add(
                "all_zero",
                "high",
                f"all-zero weights in {len(others)} tensor{'s' if len(others) > 1 else ''}: {list_names(others)}",
                tensor=others[0],
            )
        if norms:
            findings.add(
                "all_zero",
                "medium",
                f"all-zero norm weights in {len(norms)} tensor"
                f"{'s' if len(norms) > 1 else ''} (fine only for (1 + weight) norms such as Gemma's): "
                f"{list_names(norms)}",
                tensor=norms[0],
            )
    if constant:
        findings.add(
            "constant",
            "medium",
            "constant weights (every value equal) in " + list_names([f"{n} (= {fmt(v)})" for n, v in constant]),
            tensor=constant[0][0],
        )
    if exploding:
        exploding.sort(key=lambda e: -e[2])
        _add_reasons(findings, "exploding", "high", "exploding weights", [e[:2] for e in exploding], exploding[0][2])
    if fp16:
        findings.add(
            "exploding",
            "high",
            f"values beyond the float16 range (65504) in {list_names(fp16)}: this model will overflow in fp16",
            tensor=fp16[0],
        )
    _add_reasons(findings, "vanishing", "medium", "vanishing weights", vanishing)
    _add_reasons(findings, "mean_shift", "low", "weights dominated by their mean", shifted)


def _add_reasons(
    findings: Findings, category: str, severity: str, what: str, flagged: list, value: float | None = None
) -> None:
    """One finding for the (name, why) pairs `flagged`, when there are any: the first few named with why."""
    if flagged:
        names = list_names([f"{n} ({why})" for n, why in flagged], 4)
        findings.add(category, severity, f"{what} in {names}", tensor=flagged[0][0], value=value)


# Findings about the inputs around the checkpoint (an unreadable --reference), not about its weights.
NEUTRAL_CATEGORIES = frozenset({"reference"})


def health_score(findings: list[dict[str, Any]]) -> float:
    worst: dict[str, tuple[int, float]] = {}
    for f in findings:
        if f["category"] in NEUTRAL_CATEGORIES:
            continue
        factor = SEVERITY_FACTORS[f["severity"]]
        if f["category"] == "nonfinite" and f.get("share", 0.0) >= 0.5:
            factor = 0.10
        rank = int(Severity[f["severity"].upper()])
        prev = worst.get(f["category"])
        if prev is None or factor < prev[1]:
            worst[f["category"]] = (rank, factor)
    score = 1.0
    for _, factor in worst.values():
        score *= factor
    if any(f["severity"] == "critical" for f in findings):
        score = min(score, CRITICAL_CAP)
    return round(max(0.0, min(1.0, score)), 4)
