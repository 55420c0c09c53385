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
import time
from typing import Any

from .checkpoint_findings import (
    DRIFT_OVERALL_HIGH,
    DRIFT_OVERALL_LOW,
    DRIFT_RMS_FLOOR,
    DRIFT_TENSOR_HIGH,
    LR_HIGH,
    RECOMMENDATIONS,
    SEVERITY_FACTORS,
    Findings,
    classify_tensor,
    fmt,
    health_score,
    list_names,
    weight_findings,
)
from .plain_json import json_safe
from .safetensors_io import (
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


def _open(path: str | os.PathLike) -> Checkpoint:
    """`open_checkpoint`, with what a file that is no checkpoint makes the readers raise (a pickle loader's
    KeyError on random bytes, a header nested too deeply for the JSON parser, ...) as one CheckpointError line."""
    try:
        return open_checkpoint(path)
    except (CheckpointError, OSError, MemoryError):
        raise
    except RecursionError:
        raise CheckpointError(
            f"bad header: {os.fspath(path)}: nested too deeply to parse (not a checkpoint?)"
        ) from None
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        raise CheckpointError(
            f"not a checkpoint: {os.fspath(path)} could not be read as one "
            f"({type(exc).__name__}{': ' + detail if detail else ''})"
        ) from None


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
        findings = Findings()
        try:
            ckpt = _open(path)
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
                    reference = _open(reference_checkpoint)
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

    def _analyze(self, ckpt: Checkpoint, result: dict[str, Any], findings: Findings, step: int | None) -> None:
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
        read: dict[Any, dict[str, Any]] = {}  # tied weights (one view, several names) are read once
        for ref in ckpt.tensors:
            if not ref.supported:
                skipped.append({"name": ref.name, "dtype": ref.dtype, "shape": list(ref.shape)})
                continue
            if ref.share_key is not None and ref.share_key in read:
                stats = dict(read[ref.share_key])
            else:
                stats = tensor_stats(ref)
                if ref.share_key is not None:
                    read[ref.share_key] = dict(stats)
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
                f"supported): {list_names([s['name'] for s in skipped])}",
            )
        weight_findings(weight_stats, findings)
        lr = result["learning_rate"]
        if lr is not None:
            if not math.isfinite(lr):
                findings.add("learning_rate", "high", f"learning rate is {lr}", value=lr)
            elif lr > LR_HIGH:
                findings.add(
                    "learning_rate", "medium", f"learning rate {lr:.3g} is very high for fine-tuning", value=lr
                )

    def _drift(self, ckpt: Checkpoint, reference: Checkpoint, findings: Findings) -> dict[str, Any]:
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
        read: dict[tuple, tuple[float, float]] = {}  # tied weights on both sides: one reading per pair of views
        for name, cur in current.items():
            other = ref.get(name)
            if other is None or not cur.supported or not other.supported:
                continue
            if tuple(cur.shape) != tuple(other.shape):
                mismatched.append(f"{name} {list(cur.shape)} vs {list(other.shape)}")
                continue
            pair = (cur.share_key, other.share_key)
            if pair in read:
                diff_sq, ref_sq = read[pair]
            else:
                diff_sq, ref_sq = tensor_drift(cur, other)
                if None not in pair:
                    read[pair] = (diff_sq, ref_sq)
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
                + list_names([f"{n} ({v:.3g})" for n, v in big], 4),
                tensor=big[0][0],
                value=big[0][1],
            )
        if missing_in_current or missing_in_reference or mismatched:
            parts = []
            if missing_in_reference:
                parts.append(
                    f"{len(missing_in_reference)} tensors missing in the reference "
                    f"({list_names(missing_in_reference, 3)})"
                )
            if missing_in_current:
                parts.append(
                    f"{len(missing_in_current)} reference tensors missing here ({list_names(missing_in_current, 3)})"
                )
            if mismatched:
                parts.append(f"{len(mismatched)} shape mismatches ({list_names(mismatched, 3)})")
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
    def _conclude(result: dict[str, Any], findings: Findings) -> None:
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
        result["health_score"] = health_score(items)

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
        lines.append(f"Drift vs {drift.get('reference')}: overall {fmt(overall)}")
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
                f"  {fmt(s.get('rms')):>9} {fmt(s.get('std')):>9} {fmt(peak):>9} "
                f"{s.get('nan_count', 0):>5} {s.get('inf_count', 0):>5} "
                f"{100 * (s.get('zero_fraction') or 0):>6.1f}  {s.get('kind', ''):<9} {name}"
            )
    return "\n".join(lines)
