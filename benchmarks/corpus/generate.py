"""Generate the second labelled corpus: REAL TRL runs of a tiny LLaMA doing arithmetic, on CPU.

    python benchmarks/corpus/generate.py --out DIR [--only NAME ...] [--list] [--jobs 1] [--force] [--table]

Writes DIR/<run>/trainer_state.json and one entry per run in DIR/labels.json (format: README.md beside this
file and tests/data/traces/README.md, plus `kind`). Resumes: a run whose trainer_state.json and label are
both there is skipped (pass --only NAME --force to redo one). The base model is built once (seeded, about a
minute on one core) into a cache folder under the system temp dir and reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from grid import RunSpec, build_grid
from task import MAX_OPERAND, MODEL_SHAPE, build_base_model


def base_model_dir() -> Path:
    key = hashlib.sha1(json.dumps([MODEL_SHAPE, MAX_OPERAND, 3]).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"rlhf-tui-corpus-base-{key}"


def _load_labels(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_labels(path: Path, labels: dict) -> None:
    part = path.with_suffix(".json.part")
    part.write_text(json.dumps(dict(sorted(labels.items())), indent=1, allow_nan=False) + "\n")
    os.replace(part, path)


def _done(out: Path, labels: dict, name: str) -> bool:
    return name in labels and (out / name / "trainer_state.json").is_file()


def _describe(spec: RunSpec, done: bool) -> str:
    onset = "-" if spec.onset_step is None else str(spec.onset_step)
    extra = f"ramp {spec.ramp}" if spec.ramp else ""
    return (
        f"{spec.name:10} {spec.trainer:5} {spec.fault:16} {spec.kind or '-':8} onset {onset:>4}  "
        f"steps {spec.steps}  {extra:9} {'done' if done else ''}"
    )


_TABLE_KEYS = (
    ("loss_type", "loss"),
    ("num_iterations", "iters"),
    ("scale_rewards", "scale"),
    ("logging_steps", "log every"),
    ("num_generations", "gens"),
    ("beta", "beta"),
    ("temperature", "T"),
    ("max_grad_norm", "clip"),
)


def markdown_table(labels: dict) -> str:
    """The runs of a labels.json as a Markdown table (the README's list of runs)."""
    lines = [
        "| run | trainer | settings | lr schedule | fault | kind | onset | steps | fault params | attempt |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, lab in sorted(labels.items()):
        cfg = lab["config"]
        settings = ", ".join(f"{short} {cfg[key]}" for key, short in _TABLE_KEYS if key in cfg)
        sched = f"{cfg['lr_scheduler_type']} {cfg['learning_rate']:g}"
        if cfg.get("warmup_steps"):
            sched += f", warm-up {cfg['warmup_steps']}"
        params = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in lab["fault_params"].items())
        eff = lab.get("effect") or {}
        lines.append(
            f"| {name} | {lab['trainer']} | {settings} | {sched} | {lab['fault']} | {lab['kind'] or '-'} | "
            f"{lab['onset_step'] if lab['onset_step'] is not None else '-'} | {lab['steps_logged']} | "
            f"{params or '-'} | {eff.get('attempt', '-')} |"
        )
    return "\n".join(lines)


def _run_child(spec: RunSpec, model_path: str, out: str) -> dict:
    from train import run_spec

    return run_spec(spec, model_path, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (runs and labels.json)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these runs")
    ap.add_argument("--list", action="store_true", help="list the grid (and what is done in --out) and exit")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process each (default 1)")
    ap.add_argument("--force", action="store_true", help="retrain runs that are already written")
    ap.add_argument("--table", action="store_true", help="print DIR/labels.json as a Markdown table and exit")
    ns = ap.parse_args(argv)

    out = Path(ns.out)
    labels_path = out / "labels.json"
    labels = _load_labels(labels_path)
    grid = build_grid()
    if ns.only:
        unknown = set(ns.only) - {s.name for s in grid}
        if unknown:
            ap.error(f"unknown run(s): {', '.join(sorted(unknown))}")
        grid = [s for s in grid if s.name in ns.only]
    if ns.table:
        print(markdown_table(labels))
        return 0
    if ns.list:
        for spec in grid:
            print(_describe(spec, _done(out, labels, spec.name)))
        return 0
    todo = [s for s in grid if ns.force or not _done(out, labels, s.name)]
    print(f"{len(grid) - len(todo)} of {len(grid)} runs already written; training {len(todo)}", flush=True)
    if not todo:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model_path = build_base_model(base_model_dir())
    print(f"base model ready in {time.monotonic() - started:.0f} s: {model_path}", flush=True)

    def record(spec: RunSpec, label: dict) -> None:
        labels[spec.name] = label
        _write_labels(labels_path, labels)
        eff = label.get("effect") or {}
        seen = ",".join(eff.get("visible_metrics", [])[:6])
        print(
            f"{_describe(spec, True)}  {label['runtime_s']:6.1f} s  attempt {eff.get('attempt', '-')}  "
            f"expected_visible {eff.get('expected_visible', '-')}  crashed {label['crashed']}  [{seen}]",
            flush=True,
        )

    if ns.jobs <= 1:
        for spec in todo:
            record(spec, _run_child(spec, model_path, str(out)))
    else:
        import multiprocessing

        with ProcessPoolExecutor(ns.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_child, s, model_path, str(out)): s for s in todo}
            for fut in as_completed(futures):
                record(futures[fut], fut.result())
    print(f"done: {len(todo)} runs in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
