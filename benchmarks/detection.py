"""Anomaly detection measured on labelled real TRL runs: ours vs the seed's z-score rule.

    .venv/bin/python benchmarks/detection.py [--traces DIR] [--no-holdout] [--no-variations]

For every run in DIR (default `tests/data/traces` in the repository, or env RLHF_TUI_TRACES) it prints the
first alarm of severity >= medium against the fault onset, for our detectors and for the seed rule (window of
100 including the point, n >= 10, |z| > 3 on kl/policy_loss/value_loss/reward/clip_ratio). Overall:
  recall        faulty runs alarmed within 25 steps after the onset
  false alarms  runs with any medium+ alarm before the onset, or anywhere in a healthy run
  delay         median steps from onset to the first alarm (alarmed runs)
Hold-out: the most sensitive thresholds that raise no false alarm on one half of the runs, times a 1.5 safety
factor (the margin the defaults keep on all runs), scored on the other half.
Variations: the same runs with metric units rescaled (x30 KL as a per-sequence sum, x10 rewards), with
their start trimmed (earlier onsets), and healthy runs with faults of other magnitudes injected.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
try:
    from seed_baseline import seed_detect

    from rlhf_tui.analysis.detectors import detect, severity_at_least
    from rlhf_tui.analysis.thresholds import Thresholds
    from rlhf_tui.bridge.monitor.sources import load_file_source
except ImportError:  # pragma: no cover - checkout without `pip install -e .`
    sys.exit("install the package first: pip install -e .")

WITHIN = 25  # steps after the onset that count as detected (sudden faults)
WITHIN_GRADUAL = 80  # the same for gradual faults (label "kind": "gradual")
# Issue 13's goals, per corpus: caught, false-alarm runs, median delays, low entries on healthy runs.
GOALS = {"recall": 0.90, "false_alarm_rate": 0.05, "delay_sudden": 3.0, "delay_gradual": 25.0, "lows_per_100": 5.0}


# -- data ------------------------------------------------------------------------------------------------
class Run:
    """One labelled run as plain arrays (so variations can be built without touching the store)."""

    def __init__(
        self,
        name: str,
        label: dict,
        steps: np.ndarray,
        metrics: dict[str, np.ndarray],
        logged: dict[str, np.ndarray],
        meta: dict,
    ):
        self.name, self.label = name, label
        self.steps, self.metrics, self.logged, self.meta = steps, metrics, logged, meta
        self.fault = label.get("fault", "none")
        self.onset = label.get("onset_step")

    def arrays(self) -> tuple:
        return self.steps, self.metrics, self.logged, self.meta

    def derive(self, name: str, steps=None, metrics=None, logged=None, onset="keep", fault=None) -> Run:
        label = dict(self.label)
        if onset != "keep":
            label["onset_step"] = onset
        if fault is not None:
            label["fault"] = fault
        return Run(
            name,
            label,
            self.steps if steps is None else steps,
            self.metrics if metrics is None else metrics,
            self.logged if logged is None else logged,
            self.meta,
        )


def traces_dirs(args: list[str] | None) -> list[Path]:
    """The corpora: as given, else $RLHF_TUI_TRACES, else the shared traces and our own corpus."""
    if args:
        return [Path(a) for a in args]
    if os.environ.get("RLHF_TUI_TRACES"):
        return [Path(os.environ["RLHF_TUI_TRACES"])]
    ours = ROOT / "benchmarks" / "corpus" / "runs"
    return [ROOT / "tests" / "data" / "traces", *([ours] if (ours / "labels.json").is_file() else [])]


def load_runs(folder: Path) -> list[Run]:
    labels = json.loads((folder / "labels.json").read_text())
    runs = []
    for name in sorted(labels):
        path = folder / name / "trainer_state.json"
        if not path.is_file():
            continue
        hist = load_file_source(str(path)).current_run
        runs.append(
            Run(
                name,
                labels[name],
                np.asarray(hist.steps).copy(),
                {k: v.copy() for k, v in hist.metrics().items()},
                {k: v.copy() for k, v in hist.logged_masks().items()},
                dict(hist.meta),
            )
        )
    return runs


# -- scoring -----------------------------------------------------------------------------------------------
def alarm_steps_ours(run: Run, th: Thresholds) -> list[tuple[int, str]]:
    """(step, "detector/metric") at which each episode first reached severity medium or above."""
    out = []
    for ep in detect(run.arrays(), th):
        steps = [s for sev, s in ep["severity_steps"].items() if severity_at_least(sev, "medium")]
        if steps:
            out.append((min(steps), f"{ep['detector']}/{ep['metric']}"))
    return sorted(out)


def alarm_steps_seed(run: Run) -> list[tuple[int, str]]:
    return [(a["step"], f"seed_zscore/{a['metric']}") for a in seed_detect(run.steps, run.metrics)]


CUSUM_METRICS = ("kl", "reward", "entropy", "loss", "grad_norm", "rewards/accuracies")


def alarm_steps_cusum(run: Run, warmup: int = 30, k: float = 0.5, h: float = 8.0) -> list[tuple[int, str]]:
    """A textbook baseline: per metric, standardised by the mean and spread of its first `warmup` finite
    values, a two-sided CUSUM (allowance k, decision h); an alarm where either side crosses h."""
    out = []
    for name in CUSUM_METRICS:
        x = run.metrics.get(name)
        if x is None:
            continue
        fin = np.flatnonzero(np.isfinite(x))
        if fin.size <= warmup:
            continue
        ref = x[fin[:warmup]]
        sd = float(np.std(ref)) or 1e-12
        z = np.nan_to_num((x - float(np.mean(ref))) / sd)
        hi = lo = 0.0
        for i in fin[warmup:]:
            hi, lo = max(0.0, hi + z[i] - k), max(0.0, lo - z[i] - k)
            if hi > h or lo > h:
                out.append((int(run.steps[i]), f"cusum/{name}"))
                break
    return sorted(out)


def score_run(run: Run, alarms: list[tuple[int, str]], within: int = WITHIN) -> dict:
    onset = run.onset
    before = [a for a in alarms if onset is None or a[0] <= onset]
    after = [a for a in alarms if onset is not None and a[0] > onset]
    first = after[0] if after else None
    delay = first[0] - onset if first else None
    return {
        "false_alarm": bool(before),
        "before": before,
        "first": first,
        "delay": delay,
        "detected": delay is not None and delay <= within,
    }


# Faults of corpora whose labels carry no "kind": a KL coefficient set to ~0 lets the policy drift away
# step by step, the kind issue 13 calls gradual ("KL runaway after beta -> 0"); the others act at once.
KIND_OF_FAULT = {"reward_hack": "gradual", "memory_leak": "gradual", "entropy_collapse": "gradual"}


def gradual(run: Run) -> bool:
    return (run.label.get("kind") or KIND_OF_FAULT.get(run.fault, "sudden")) == "gradual"


def overall(runs: list[Run], scores: list[dict]) -> dict:
    """Caught: the first alarm after the onset in time and none before it (a faulty run alarmed early is a
    false-alarm run, not a catch)."""
    faulty = [(r, s) for r, s in zip(runs, scores) if r.onset is not None]
    caught = [(r, s) for r, s in faulty if s["detected"] and not s["false_alarm"]]

    def median(xs: list) -> float:
        return statistics.median(xs) if xs else math.nan

    return {
        "runs": len(runs),
        "faulty": len(faulty),
        "recall": (len(caught) / len(faulty)) if faulty else math.nan,
        "false_alarm_runs": sum(s["false_alarm"] for s in scores),
        "false_alarm_rate": sum(s["false_alarm"] for s in scores) / len(runs) if runs else math.nan,
        "median_delay": median([s["delay"] for _r, s in caught]),
        "delay_sudden": median([s["delay"] for r, s in caught if not gradual(r)]),
        "delay_gradual": median([s["delay"] for r, s in caught if gradual(r)]),
    }


def within_for(run: Run, th: Thresholds) -> int:
    """Slow faults get their detector's window on top: a leak is judged over memory_leak_blocks blocks."""
    if run.fault == "memory_leak":
        return WITHIN + th.memory_leak_blocks * th.block_steps
    return WITHIN_GRADUAL if gradual(run) else WITHIN


def evaluate(runs: list[Run], th: Thresholds) -> tuple[list[dict], dict]:
    scores = [score_run(r, alarm_steps_ours(r, th), within_for(r, th)) for r in runs]
    return scores, overall(runs, scores)


def lows_per_100(runs: list[Run], th: Thresholds) -> float:
    """Low entries per 100 logged steps on the healthy runs."""
    healthy = [r for r in runs if r.onset is None]
    rows = sum(r.steps.shape[0] for r in healthy)
    lows = sum(e["severity"] == "low" for r in healthy for e in detect(r.arrays(), th))
    return 100.0 * lows / rows if rows else math.nan


def fmt_overall(name: str, o: dict) -> str:
    return (
        f"{name:34s} caught {o['recall']:5.2f} ({round(o['recall'] * o['faulty'])}/{o['faulty']})   "
        f"false-alarm runs {o['false_alarm_runs']}/{o['runs']} ({100 * o['false_alarm_rate']:.0f}%)   "
        f"median delay {o['median_delay']:.1f} (sudden {o['delay_sudden']:.1f}, gradual {o['delay_gradual']:.1f})"
    )


# -- hold-out ------------------------------------------------------------------------------------------------
TUNED = {  # threshold: grid from most to least sensitive
    "shift_h": [3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 10.0],
    "rise_h": [4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0],
    "kl_runaway_factor": [5.0, 7.5, 10.0, 12.5, 15.0, 20.0, 30.0],
    "fraction_floor": [0.1, 0.125, 0.15, 0.2, 0.25, 0.3],
    "grad_norm_factor": [3.0, 3.5, 4.0, 5.0, 6.0, 8.0],
}


def tune(runs: list[Run], safety: float = 1.5) -> Thresholds:
    """Per threshold (others at default): the most sensitive grid value with no false-alarm run, x safety."""
    chosen = {}
    for name, grid in TUNED.items():
        pick = grid[-1]
        for value in grid:
            _, o = evaluate(runs, Thresholds().replace(**{name: value}))
            if o["false_alarm_runs"] == 0:
                pick = value
                break
        chosen[name] = pick * safety
    return Thresholds().replace(**chosen)


# -- variations ------------------------------------------------------------------------------------------------
REWARD_KEYS = ("reward", "reward_std")


def rescaled(run: Run) -> Run:
    m = dict(run.metrics)
    for k in list(m):
        if k in ("kl", "objective/kl"):
            m[k] = m[k] * 30.0  # per-sequence sum instead of per-token mean
        elif k in REWARD_KEYS or k.startswith("rewards/"):
            m[k] = m[k] * 10.0 if not k.startswith(("rewards/accuracies",)) else m[k]
        elif k == "entropy":
            m[k] = m[k] * 20.0
    return run.derive(run.name + "@units", metrics=m)


def trimmed(run: Run, rows: int) -> Run | None:
    keep_before = 40  # a shorter history leaves no baseline at all
    if run.onset is not None:
        onset_row = int(np.searchsorted(run.steps, run.onset))
        rows = min(rows, onset_row - keep_before)
    if rows <= 0:
        return None
    cut = slice(rows, None)
    return run.derive(
        f"{run.name}@trim{rows}",
        steps=run.steps[cut],
        metrics={k: v[cut] for k, v in run.metrics.items()},
        logged={k: v[cut] for k, v in run.logged.items()},
    )


def injected(run: Run, fault: str, magnitude: float, onset_row: int, seed: int) -> Run | None:
    """A healthy run with a synthetic fault switched on after row `onset_row`."""
    rng = np.random.default_rng(seed)
    m = {k: v.copy() for k, v in run.metrics.items()}
    lg = {k: v.copy() for k, v in run.logged.items()}
    n = run.steps.shape[0]
    after = np.arange(n) > onset_row
    k = int(after.sum())
    parts = [x for x in m if x.startswith("rewards/") and x.endswith("/mean")]
    if fault in ("reward_scale", "reward_nan") and "rewards/margins" in m:
        return None  # DPO has no reward model
    if fault == "reward_scale":
        for key in ("reward", "reward_std", *[x for x in m if x.startswith("rewards/")]):
            if key in m and key not in ("rewards/accuracies",):
                m[key][after] *= magnitude
    elif fault == "reward_drop":  # reward function returning noise: mean falls by `magnitude` spreads
        if "reward" not in m or "rewards/margins" in m:
            return None
        sd = float(np.nanstd(m["reward"][: onset_row + 1]))
        m["reward"][after] -= magnitude * sd
        for p in parts[:1]:
            m[p][after] -= magnitude * sd
    elif fault == "reward_climb":  # reward hacking: reward climbs `magnitude` spreads per 10 steps
        if "reward" not in m or "rewards/margins" in m:
            return None
        sd = float(np.nanstd(m["reward"][: onset_row + 1]))
        ramp = np.cumsum(after) * magnitude * sd / 10.0
        m["reward"] += ramp
        for p in parts[:1]:
            m[p] += ramp
    elif fault == "reward_nan":  # a fraction of rewards NaN: TRL drops them from the sum
        if not parts or "reward" not in m:
            return None
        p = parts[0]
        frac = magnitude
        m["reward"][after] -= frac * m[p][after]
        std_key = p[: -len("mean")] + "std"
        if std_key in m:
            none_rows = np.flatnonzero(after & (rng.random(n) < frac**3))
            m[std_key][none_rows] = np.nan
    elif fault == "kl_runaway":
        if "kl" not in m:
            return None
        base = float(np.nanmedian(np.abs(m["kl"][: onset_row + 1]))) or 1e-3
        m["kl"][after] = np.abs(m["kl"][after]) + magnitude * base * np.exp(0.5 * rng.standard_normal(k))
    elif fault == "entropy_collapse":
        if "entropy" not in m:
            return None
        m["entropy"][after] *= np.exp(-np.arange(1, k + 1) / magnitude)
    elif fault == "label_flip":
        if "rewards/accuracies" not in m:
            return None
        a = m["rewards/accuracies"][after]
        m["rewards/accuracies"][after] = np.round((a * (1 - magnitude) + (1 - a) * magnitude) * 8) / 8
        if "rewards/margins" in m:
            m["rewards/margins"][after] *= 1 - 2 * magnitude
            m["reward"] = m["rewards/margins"]
    elif fault == "memory_leak":  # system series added: flat, then growing `magnitude` % per 100 steps
        rss = 2000 + 5 * rng.standard_normal(n)
        rss[after] += 2000 * magnitude / 100 * np.arange(1, k + 1) / 100
        frac = 0.5 + 0.01 * rng.standard_normal(n)
        m["memory/rss_mb"], m["memory/gpu_frac"] = rss, frac
        lg["memory/rss_mb"] = lg["memory/gpu_frac"] = np.ones(n, dtype=bool)
    elif fault == "near_oom":
        frac = 0.5 + 0.01 * rng.standard_normal(n)
        frac[after] = np.minimum(0.5 + magnitude * np.arange(1, k + 1) / 20, 0.99)
        m["memory/gpu_frac"] = frac
        lg["memory/gpu_frac"] = np.ones(n, dtype=bool)
    else:
        raise ValueError(fault)
    onset_step = int(run.steps[onset_row])
    return run.derive(
        f"{run.name}+{fault}x{magnitude:g}@{onset_step}", metrics=m, logged=lg, onset=onset_step, fault=fault
    )


INJECTIONS: dict[str, tuple[float, ...]] = {
    "reward_scale": (5.0, 30.0, 1000.0),
    "reward_drop": (1.5, 3.0),
    "reward_climb": (1.0, 3.0),
    "reward_nan": (0.3, 0.8),
    "kl_runaway": (30.0, 300.0),
    "entropy_collapse": (5.0, 20.0),
    "label_flip": (0.4, 0.8),
    "memory_leak": (10.0, 40.0),
    "near_oom": (0.1, 0.5),
}


def variations(runs: list[Run], th: Thresholds) -> list[tuple[str, list[Run]]]:
    healthy = [r for r in runs if r.onset is None]
    out = [("units rescaled (KL x30, rewards x10)", [rescaled(r) for r in runs])]
    out.append(("start trimmed by up to 80 steps", [t for r in runs for t in [trimmed(r, 80)] if t]))
    inj = []
    for r in healthy:
        n = r.steps.shape[0]
        for fault, mags in INJECTIONS.items():
            for j, mag in enumerate(mags):
                for frac in (0.35, 0.7):
                    v = injected(r, fault, mag, int(n * frac), seed=zlib.crc32(f"{r.name}/{fault}/{j}".encode()))
                    if v is not None:
                        inj.append(v)
    out.append(("faults injected into healthy runs", inj))
    return out


# -- main ------------------------------------------------------------------------------------------------------
def report_corpus(folder: Path, args: argparse.Namespace, th: Thresholds) -> list[str]:
    """Print one corpus's table and figures; the goals it misses."""
    runs = load_runs(folder)
    ours = [score_run(r, alarm_steps_ours(r, th), within_for(r, th)) for r in runs]
    seed = [score_run(r, alarm_steps_seed(r), within_for(r, th)) for r in runs]
    cusum = [score_run(r, alarm_steps_cusum(r), within_for(r, th)) for r in runs]

    def cell(s: dict) -> str:
        if s["first"] is None:
            text = "none"
        else:
            text = f"{s['delay']:+d} {s['first'][1]}"
        if s["before"]:
            b = s["before"][0]
            text = f"FALSE@{b[0]} {b[1]} | " + text
        return text

    print(f"traces: {folder}\n")
    print(
        f"{'run':10s} {'trainer':12s} {'fault':18s} {'kind':7s} {'onset':>5s}  "
        f"{'ours: first medium+ alarm (delay)':46s}  seed rule"
    )
    for r, o, s in zip(runs, ours, seed):
        print(
            f"{r.name:10s} {str(r.label.get('trainer'))[:12]:12s} {r.fault:18s} {str(r.label.get('kind') or '')[:7]:7s} "
            f"{str(r.onset):>5s}  {cell(o)[:46]:46s}  {cell(s)[:60]}"
        )
    print()
    score = overall(runs, ours)
    lows = lows_per_100(runs, th)
    print(fmt_overall("ours", score) + f"   lows per 100 healthy steps {lows:.1f}")
    print(fmt_overall("seed z-score (w=100 incl., n>=10, z>3)", overall(runs, seed)))
    print(fmt_overall("CUSUM baseline (k=0.5, h=8)", overall(runs, cusum)))

    if not args.no_holdout:
        print("\nhold-out (thresholds tuned on one half, scored on the other):")
        faulty = [r for r in runs if r.onset is not None]
        healthy = [r for r in runs if r.onset is None]
        half_a = faulty[0::2] + healthy[0::2]
        half_b = faulty[1::2] + healthy[1::2]
        for tune_on, test_on, label in ((half_a, half_b, "A->B"), (half_b, half_a, "B->A")):
            tuned = tune(tune_on)
            _, o_seen = evaluate(tune_on, tuned)
            _, o_unseen = evaluate(test_on, tuned)
            picks = ", ".join(f"{k}={getattr(tuned, k):.3g}" for k in TUNED)
            print(f"  {label} tuned: {picks}")
            print("  " + fmt_overall(f"{label} seen half", o_seen))
            print("  " + fmt_overall(f"{label} unseen half", o_unseen))
        _, o_def_a = evaluate(half_a, th)
        _, o_def_b = evaluate(half_b, th)
        print("  " + fmt_overall("defaults on half A", o_def_a))
        print("  " + fmt_overall("defaults on half B", o_def_b))

    if not args.no_variations:
        print("\nvariations (default thresholds):")
        base = {r.name: s for r, s in zip(runs, ours)}
        for title, vruns in variations(runs, th):
            vs, o = evaluate(vruns, th)
            line = fmt_overall(f"{title} [{len(vruns)}]", o)
            if title.startswith("units"):
                same = sum(
                    (s["first"] or (None,))[0] == (base[r.name.split("@")[0]]["first"] or (None,))[0]
                    for r, s in zip(vruns, vs)
                )
                line += f"   same first alarm as original: {same}/{len(vruns)}"
            print(line)
            if title.startswith("faults"):
                by_fault: dict[str, list[dict]] = {}
                for r, s in zip(vruns, vs):
                    by_fault.setdefault(r.fault, []).append(s)
                for fault, ss in by_fault.items():
                    det = [s for s in ss if s["detected"]]
                    d = statistics.median([s["delay"] for s in det]) if det else math.nan
                    fa = sum(s["false_alarm"] for s in ss)
                    horizon = within_for(next(r for r in vruns if r.fault == fault), th)
                    print(
                        f"    {fault:18s} detected within {horizon:3d} steps {len(det):2d}/{len(ss):2d}  "
                        f"median delay {d:5.1f}  false alarms before onset {fa}"
                    )
    missed = []
    if not score["recall"] >= GOALS["recall"]:
        missed.append(f"caught {score['recall']:.2f} < {GOALS['recall']}")
    if not score["false_alarm_rate"] <= GOALS["false_alarm_rate"]:
        missed.append(f"false-alarm runs {score['false_alarm_rate']:.2f} > {GOALS['false_alarm_rate']}")
    for key in ("delay_sudden", "delay_gradual"):
        if score[key] > GOALS[key]:  # (NaN: no such fault in this corpus)
            missed.append(f"{key} {score[key]:.1f} > {GOALS[key]}")
    if not lows <= GOALS["lows_per_100"]:
        missed.append(f"lows per 100 steps {lows:.1f} > {GOALS['lows_per_100']}")
    return [f"{folder.name}: {m}" for m in missed]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="anomaly detection on labelled TRL traces: ours vs the seed rule")
    ap.add_argument(
        "--traces",
        action="append",
        help="folder with labels.json and <run>/trainer_state.json "
        "(repeatable; default: tests/data/traces and benchmarks/corpus/runs)",
    )
    ap.add_argument("--no-holdout", action="store_true")
    ap.add_argument("--no-variations", action="store_true")
    args = ap.parse_args(argv)
    folders = traces_dirs(args.traces)
    for folder in folders:
        if not (folder / "labels.json").is_file():
            print(f"no labelled traces in {folder} (labels.json missing)", file=sys.stderr)
            return 2
    th = Thresholds()
    missed = []
    for i, folder in enumerate(folders):
        if i:
            print("\n" + "=" * 100 + "\n")
        missed += report_corpus(folder, args, th)
    if missed:
        print("\nGOAL MISSED: " + "; ".join(missed))
        return 1
    print("\nall goals met on " + ", ".join(str(f) for f in folders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
