"""Checkpoint health: per-tensor weight statistics, scale-aware findings, drift against a reference, and one
0..1 health score. Pure numpy + stdlib (torch only inside the function that must read a ``.pt``/``.bin``).

Health score (also in docs/checkpoint-health.md)::

    score = min(cap, Π_c factor(worst severity found in check c))
    factor: low 0.95, medium 0.80, high 0.60, critical 0.35 (0.10 when NaN/Inf hit ≥ half of the tensors)
    cap:    0.50 when any finding is critical, else 1.0

Each check c counts once however many tensors it hits, so a big model is not punished for having more tensors.
Checks judge relative scale, never absolute norms: a tensor's RMS against ~1/sqrt(fan) (×1/100..×100 tolerance)
and against the median RMS of tensors of the same kind (×1/50..×50), norm weights against all-zero/exploding,
NaN/Inf, all-zero or constant tensors that are not so by design (biases, norm layers at init, LoRA B), and the
drift ‖θ − θ_ref‖/‖θ_ref‖ (overall > 0.5 or one tensor > 1.0 is high).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
from typing import Any

from .safetensors_io import (
    FLOAT_DTYPES,
    Checkpoint,
    CheckpointError,
    open_checkpoint,
    parse_step_from_path,
    read_training_state,
    tensor_drift,
    tensor_stats,
)
from .severity import Severity

__all__ = [
    "CheckpointAnalyzer",
    "CheckpointError",
    "classify_tensor",
    "format_checkpoint_text",
    "json_safe",
    "SEVERITY_FACTORS",
]

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


def json_safe(value: Any) -> Any:
    """Copy of ``value`` that ``json.dumps(allow_nan=False)`` accepts: NaN/Inf → None, tuples → lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    try:  # numpy scalars
        return json_safe(value.item())
    except AttributeError:
        return str(value)


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


class _Findings:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(
        self, category: str, severity: str, message: str, tensor: str | None = None, value: float | None = None
    ) -> None:
        self.items.append(
            {"category": category, "severity": severity, "message": message, "tensor": tensor, "value": value}
        )


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.3g}"
    return str(x)


def _list_names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _weight_findings(weight_stats: dict[str, dict[str, Any]], findings: _Findings) -> None:
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
                f"{label} values in {len(hits)} tensor{'s' if len(hits) > 1 else ''}: {_list_names(detail)}",
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
            exploding.append((name, f"rms {_fmt(s['rms'])}, largest |value| {_fmt(peak)}", s["rms"]))
        if peak > FP16_MAX:
            fp16.append(name)
        if _is_weight_matrix(name, s) and not _zero_by_design(name, kind):
            d0, d1 = s["shape"]
            expected = 1.0 / math.sqrt(math.sqrt(d0 * d1))  # ~1/sqrt(fan_in) whatever the layout
            ratio = s["rms"] / expected
            if kind != "embedding" and ratio > INIT_SCALE_TOLERANCE and s["rms"] <= EXPLODING_RMS:
                exploding.append(
                    (name, f"rms {_fmt(s['rms'])} is {ratio:.0f}× the ~1/sqrt(fan_in) scale {_fmt(expected)}", s["rms"])
                )
            elif kind != "embedding" and ratio < 1.0 / INIT_SCALE_TOLERANCE:
                vanishing.append(
                    (name, f"rms {_fmt(s['rms'])} is 1/{1 / ratio:.0f} of the ~1/sqrt(fan_in) scale {_fmt(expected)}")
                )
            if (
                kind in ("attention", "mlp", "other")
                and s["numel"] >= 1024
                and s["std"] is not None
                and abs(s["mean"]) > MEAN_SHIFT_RATIO * s["std"]
            ):
                shifted.append((name, f"mean {_fmt(s['mean'])}, std {_fmt(s['std'])}"))
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
                        f"rms {_fmt(rms)} is {rms / median:.0f}× the median of {len(members)} "
                        f"{kind} tensors ({_fmt(median)})",
                        rms,
                    )
                )
            elif rms < median / PEER_OUTLIER_FACTOR:
                vanishing.append(
                    (
                        name,
                        f"rms {_fmt(rms)} is 1/{median / rms:.0f} of the median of "
                        f"{len(members)} {kind} tensors ({_fmt(median)})",
                    )
                )

    if zero:
        norms = [n for n in zero if weight_stats[n]["kind"] == "norm"]
        others = [n for n in zero if n not in norms]
        if others:
            findings.add(
                "all_zero",
                "high",
                f"all-zero weights in {len(others)} tensor{'s' if len(others) > 1 else ''}: {_list_names(others)}",
                tensor=others[0],
            )
        if norms:
            findings.add(
                "all_zero",
                "medium",
                f"all-zero norm weights in {len(norms)} tensor"
                f"{'s' if len(norms) > 1 else ''} (fine only for (1 + weight) norms such as Gemma's): "
                f"{_list_names(norms)}",
                tensor=norms[0],
            )
    if constant:
        findings.add(
            "constant",
            "medium",
            "constant weights (every value equal) in " + _list_names([f"{n} (= {_fmt(v)})" for n, v in constant]),
            tensor=constant[0][0],
        )
    if exploding:
        exploding.sort(key=lambda e: -e[2])
        findings.add(
            "exploding",
            "high",
            "exploding weights in " + _list_names([f"{n} ({why})" for n, why, _ in exploding], 4),
            tensor=exploding[0][0],
            value=exploding[0][2],
        )
    if fp16:
        findings.add(
            "exploding",
            "high",
            f"values beyond the float16 range (65504) in {_list_names(fp16)}: this model will overflow in fp16",
            tensor=fp16[0],
        )
    if vanishing:
        findings.add(
            "vanishing",
            "medium",
            "vanishing weights in " + _list_names([f"{n} ({why})" for n, why in vanishing], 4),
            tensor=vanishing[0][0],
        )
    if shifted:
        findings.add(
            "mean_shift",
            "low",
            "weights dominated by their mean in " + _list_names([f"{n} ({why})" for n, why in shifted], 4),
            tensor=shifted[0][0],
        )


# Findings about the inputs around the checkpoint (an unreadable --reference), not about its weights.
NEUTRAL_CATEGORIES = frozenset({"reference"})


def _health_score(findings: list[dict[str, Any]]) -> float:
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


class CheckpointAnalyzer:
    """Analyse saved checkpoints (seed API): ``analyze_checkpoint(model_path, step, reference_checkpoint)``."""

    def __init__(self, log_dir: str | os.PathLike | None = None, *, top_k: int = 5):
        self.log_dir = os.fspath(log_dir) if log_dir is not None else None
        self.top_k = top_k
        self.last_result: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------- public
    def analyze_checkpoint(
        self,
        model_path: str | os.PathLike,
        step: int | None = None,
        reference_checkpoint: str | os.PathLike | None = None,
        *,
        strict: bool = False,
    ) -> dict[str, Any]:
        """Analyse one checkpoint. Never raises unless ``strict``: a missing, truncated or unsafe checkpoint
        gives ``health_score`` 0.0, an ``error`` line and an issue naming the problem."""
        started = time.perf_counter()
        path = os.fspath(model_path)
        result: dict[str, Any] = {
            "path": path,
            "step": step,
            "health_score": 0.0,
            "format": None,
            "file_size_mb": 0.0,
            "num_tensors": 0,
            "num_parameters": 0,
            "learning_rate": None,
            "weight_stats": {},
            "issues": [],
            "recommendations": [],
            "findings": [],
            "drift": None,
            "skipped_tensors": [],
        }
        findings = _Findings()
        try:
            ckpt = open_checkpoint(path)
            self._analyze(ckpt, result, findings, step)
        except CheckpointError as exc:
            if strict:
                raise
            self._fail(result, str(exc))
        except (OSError, ValueError, MemoryError) as exc:
            err = CheckpointError(f"unreadable checkpoint {path}: {exc}")
            if strict:
                raise err from None
            self._fail(result, str(err))
        except Exception as exc:  # a bug of ours must not take the monitor (or training) down
            if strict:
                raise
            self._fail(result, f"internal error while analysing {path}: {type(exc).__name__}: {exc}")
        else:
            if reference_checkpoint is not None:
                try:
                    reference = open_checkpoint(reference_checkpoint)
                    result["drift"] = self._drift(ckpt, reference, findings)
                except CheckpointError as exc:
                    if strict:
                        raise
                    findings.add("reference", "low", f"reference checkpoint unreadable, drift not computed: {exc}")
                except (OSError, ValueError) as exc:
                    if strict:
                        raise CheckpointError(f"unreadable reference {reference_checkpoint}: {exc}") from None
                    findings.add("reference", "low", f"reference checkpoint unreadable, drift not computed: {exc}")
            self._conclude(result, findings)
        result["elapsed_s"] = round(time.perf_counter() - started, 4)
        result = json_safe(result)
        self._log(result)
        self.last_result = result
        return result

    def analyze_checkpoint_strict(
        self,
        model_path: str | os.PathLike,
        step: int | None = None,
        reference_checkpoint: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        """Same as :meth:`analyze_checkpoint` but raises :class:`CheckpointError` for unreadable input."""
        return self.analyze_checkpoint(model_path, step, reference_checkpoint, strict=True)

    # ------------------------------------------------------------------------------------------ internals
    @staticmethod
    def _fail(result: dict[str, Any], message: str) -> None:
        result["error"] = message
        result["health_score"] = 0.0
        result["issues"] = [f"checkpoint unreadable: {message}"]
        category = "unsafe" if message.startswith("refused") else "unreadable"
        result["findings"] = [
            {"category": category, "severity": "critical", "message": message, "tensor": None, "value": None}
        ]
        result["recommendations"] = [RECOMMENDATIONS[category]]

    def _analyze(self, ckpt: Checkpoint, result: dict[str, Any], findings: _Findings, step: int | None) -> None:
        result["format"] = ckpt.format
        result["resolved_path"] = ckpt.path
        result["files"] = ckpt.files
        result["file_size_mb"] = round(ckpt.file_size_bytes / 2**20, 3)
        state = read_training_state(ckpt.folder)
        if step is None:
            step = state.get("global_step")
        if step is None:
            step = parse_step_from_path(ckpt.path)
        result["step"] = step
        result["learning_rate"] = state.get("learning_rate")
        weight_stats: dict[str, dict[str, Any]] = {}
        skipped: list[dict[str, Any]] = []
        for ref in ckpt.tensors:
            if not ref.supported:
                skipped.append({"name": ref.name, "dtype": ref.dtype, "shape": list(ref.shape)})
                continue
            stats = tensor_stats(ref)
            stats["kind"] = classify_tensor(ref.name, ref.shape)
            weight_stats[ref.name] = stats
        result["weight_stats"] = weight_stats
        result["skipped_tensors"] = skipped
        result["num_tensors"] = len(ckpt.tensors)
        result["num_parameters"] = int(sum(t.numel for t in ckpt.tensors))
        if not ckpt.tensors:
            findings.add("incomplete", "high", f"the checkpoint holds no tensors: {ckpt.path}")
        for problem in ckpt.problems:
            findings.add("incomplete", "high", problem)
        if skipped:
            dtypes = sorted({s["dtype"] for s in skipped})
            findings.add(
                "skipped",
                "low",
                f"{len(skipped)} tensors not checked (dtype {', '.join(dtypes)} is not "
                f"supported): {_list_names([s['name'] for s in skipped])}",
            )
        _weight_findings(weight_stats, findings)
        lr = result["learning_rate"]
        if lr is not None:
            if not math.isfinite(lr):
                findings.add("learning_rate", "high", f"learning rate is {lr}", value=lr)
            elif lr > LR_HIGH:
                findings.add(
                    "learning_rate", "medium", f"learning rate {lr:.3g} is very high for fine-tuning", value=lr
                )

    def _drift(self, ckpt: Checkpoint, reference: Checkpoint, findings: _Findings) -> dict[str, Any]:
        current = ckpt.by_name
        ref = reference.by_name
        per_tensor: dict[str, float | None] = {}
        judged: dict[str, float] = {}  # relative drift with the reference RMS floored (see DRIFT_RMS_FLOOR)
        from_zero: list[str] = []
        nonfinite: list[str] = []
        diff_total = 0.0
        ref_total = 0.0
        missing_in_current = [n for n in ref if n not in current]
        missing_in_reference = [n for n in current if n not in ref]
        mismatched = []
        for name, cur in current.items():
            other = ref.get(name)
            if other is None or not cur.supported or not other.supported:
                continue
            if tuple(cur.shape) != tuple(other.shape):
                mismatched.append(f"{name} {list(cur.shape)} vs {list(other.shape)}")
                continue
            diff_sq, ref_sq = tensor_drift(cur, other)
            if not (math.isfinite(diff_sq) and math.isfinite(ref_sq)):
                per_tensor[name] = None
                nonfinite.append(name)
                continue
            diff_total += diff_sq
            ref_total += ref_sq
            # Near-zero references (biases and LayerNorm shifts a few steps after a zero init) make any move look
            # huge relatively; judge them against a small RMS floor instead of their own size.
            judged[name] = math.sqrt(diff_sq / max(ref_sq, cur.numel * DRIFT_RMS_FLOOR**2, 1e-30))
            if ref_sq > 0:
                per_tensor[name] = math.sqrt(diff_sq / ref_sq)
            elif diff_sq == 0:
                per_tensor[name] = 0.0
            else:  # moved away from an all-zero reference (lora_B, fresh biases): no relative scale
                per_tensor[name] = None
                from_zero.append(name)
        overall = math.sqrt(diff_total / ref_total) if ref_total > 0 else (0.0 if diff_total == 0 else None)
        ranked = sorted(((n, v) for n, v in per_tensor.items() if v is not None), key=lambda kv: -kv[1])
        top = [[n, v] for n, v in ranked[: self.top_k]]
        if overall is not None and overall > DRIFT_OVERALL_HIGH:
            findings.add(
                "drift",
                "high",
                f"overall drift from the reference is {overall:.3g} (relative L2; above {DRIFT_OVERALL_HIGH})",
                value=overall,
            )
        elif overall is not None and overall > DRIFT_OVERALL_LOW:
            findings.add(
                "drift", "low", f"overall drift from the reference is {overall:.3g} (relative L2)", value=overall
            )
        big = sorted(((n, v) for n, v in judged.items() if v > DRIFT_TENSOR_HIGH), key=lambda kv: -kv[1])
        if big:
            findings.add(
                "drift",
                "high",
                "tensors that moved more than their own size from the reference: "
                + _list_names([f"{n} ({v:.3g})" for n, v in big], 4),
                tensor=big[0][0],
                value=big[0][1],
            )
        if missing_in_current or missing_in_reference or mismatched:
            parts = []
            if missing_in_reference:
                parts.append(
                    f"{len(missing_in_reference)} tensors missing in the reference "
                    f"({_list_names(missing_in_reference, 3)})"
                )
            if missing_in_current:
                parts.append(
                    f"{len(missing_in_current)} reference tensors missing here ({_list_names(missing_in_current, 3)})"
                )
            if mismatched:
                parts.append(f"{len(mismatched)} shape mismatches ({_list_names(mismatched, 3)})")
            findings.add("structure", "medium", "checkpoint and reference differ: " + "; ".join(parts))
        return {
            "reference": reference.path,
            "overall": overall,
            "per_tensor": per_tensor,
            "top": top,
            "from_zero": from_zero,
            "nonfinite": nonfinite,
            "missing_in_reference": missing_in_reference,
            "missing_in_checkpoint": missing_in_current,
            "shape_mismatch": mismatched,
        }

    @staticmethod
    def _conclude(result: dict[str, Any], findings: _Findings) -> None:
        items = findings.items
        items.sort(key=lambda f: -Severity[f["severity"].upper()])
        result["findings"] = items
        result["issues"] = [f["message"] for f in items]
        recs: list[str] = []
        for f in items:
            rec = RECOMMENDATIONS.get(f["category"])
            if rec and rec not in recs:
                recs.append(rec)
        result["recommendations"] = recs
        result["health_score"] = _health_score(items)

    def _log(self, result: dict[str, Any]) -> None:
        if not self.log_dir:
            return
        try:
            os.makedirs(self.log_dir, exist_ok=True)
            line = json.dumps({"event": "checkpoint_analysis", "timestamp": time.time(), **result}, allow_nan=False)
            with open(os.path.join(self.log_dir, "checkpoint_analysis.jsonl"), "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except (OSError, TypeError, ValueError) as exc:
            message = f"could not write the analysis log in {self.log_dir}: {exc}"
            result["issues"].append(message)
            if RECOMMENDATIONS["log"] not in result["recommendations"]:
                result["recommendations"].append(RECOMMENDATIONS["log"])


def format_checkpoint_text(result: dict[str, Any], worst: int = 5) -> str:
    """Compact plain-text rendering of an ``analyze_checkpoint`` result (``--format text``)."""
    lines = []
    score = result.get("health_score")
    score_txt = f"{score:.2f}" if isinstance(score, (int, float)) else "n/a"
    verdict = (
        "unreadable"
        if result.get("error")
        else "healthy"
        if (score or 0) >= 0.9
        else "check"
        if (score or 0) >= 0.6
        else "unhealthy"
    )
    lines.append(f"Checkpoint  {result.get('path')}")
    head = [f"health {score_txt} ({verdict})"]
    if result.get("format"):
        head.append(result["format"])
    head.append(f"{result.get('file_size_mb') or 0:.1f} MB")
    head.append(f"step {result['step']}" if result.get("step") is not None else "step n/a")
    if result.get("num_parameters"):
        head.append(f"{result['num_parameters']:,} params in {result.get('num_tensors')} tensors")
    if result.get("learning_rate") is not None:
        head.append(f"lr {result['learning_rate']:.3g}")
    if result.get("elapsed_s") is not None:
        head.append(f"{result['elapsed_s']:.2f}s")
    lines.append("  " + " | ".join(head))
    if result.get("error"):
        lines.append(f"  error: {result['error']}")
    issues = result.get("issues") or []
    lines.append(f"Issues ({len(issues)})" if issues else "Issues: none")
    lines.extend(f"  - {i}" for i in issues)
    recs = result.get("recommendations") or []
    if recs:
        lines.append("Recommendations")
        lines.extend(f"  - {r}" for r in recs)
    drift = result.get("drift")
    if drift:
        overall = drift.get("overall")
        lines.append(f"Drift vs {drift.get('reference')}: overall {_fmt(overall)}")
        for name, value in drift.get("top") or []:
            lines.append(f"  {value:10.4g}  {name}")
    stats = result.get("weight_stats") or {}
    if stats:

        def badness(item: tuple[str, dict[str, Any]]) -> tuple:
            _, s = item
            return (s.get("nan_count", 0) + s.get("inf_count", 0), s.get("rms") or 0.0)

        ranked = sorted(stats.items(), key=badness, reverse=True)[:worst]
        lines.append(f"Largest tensors by NaN/Inf, then RMS (of {len(stats)})")
        lines.append(f"  {'rms':>9} {'std':>9} {'max|x|':>9} {'nan':>5} {'inf':>5} {'zero%':>6}  {'kind':<9} name")
        for name, s in ranked:
            peak = max(abs(s["min"]), abs(s["max"])) if s.get("min") is not None else None
            lines.append(
                f"  {_fmt(s.get('rms')):>9} {_fmt(s.get('std')):>9} {_fmt(peak):>9} "
                f"{s.get('nan_count', 0):>5} {s.get('inf_count', 0):>5} "
                f"{100 * (s.get('zero_fraction') or 0):>6.1f}  {s.get('kind', ''):<9} {name}"
            )
    return "\n".join(lines)
