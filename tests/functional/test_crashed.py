"""A training that raises is told apart from one that ended: run_end says "crashed" and why, and the monitor
shows it (not "stale" forever)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from rlhf_tui.analysis.report import build_report
from rlhf_tui.bridge.monitor.sources import load_file_source
from rlhf_tui.tui.render import connection_text

SCRIPT = textwrap.dedent(
    """
    import sys
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
    cb = RLHFMonitorCallback(address=False, log_dir=sys.argv[1], analyze_checkpoints=False)
    for step in range(1, 6):
        cb.log_step(step, {"loss": 1.0 / step})
    raise RuntimeError("CUDA out of memory (a stand-in)\\nsecond line")
    """
)


def test_a_script_that_raises_ends_its_run_as_crashed_with_the_exception(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "RuntimeError" in proc.stderr  # the user's traceback is untouched
    (log,) = tmp_path.glob("*.jsonl")
    end = [json.loads(line) for line in log.read_text().splitlines()][-1]
    assert end["event"] == "run_end" and end["status"] == "crashed"
    assert end["error"] == "RuntimeError: CUDA out of memory (a stand-in)"
    report = build_report(load_file_source(str(log)))
    assert report["run"]["status"] == "crashed" and report["run"]["error"].startswith("RuntimeError")
    assert connection_text(report).plain == "✖ recorded, run crashed: RuntimeError: CUDA out of memory (a stand-in)"


def test_a_with_block_that_raises_and_a_train_that_never_ended_are_crashed_runs(tmp_path):
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

    try:
        with RLHFMonitorCallback(address=False, log_dir=str(tmp_path / "a"), analyze_checkpoints=False) as cb:
            cb.log_step(1, {"loss": 1.0})
            raise ValueError("bad batch")
    except ValueError:
        pass
    end = [json.loads(line) for line in open(cb.log_path)][-1]
    assert (end["status"], end["error"]) == ("crashed", "ValueError: bad batch")

    cb = RLHFMonitorCallback(address=False, log_dir=str(tmp_path / "b"), analyze_checkpoints=False)
    cb.on_train_begin(args=None, state=None, control=None)  # a train() that raises never calls on_train_end
    cb.log_step(1, {"loss": 1.0})
    cb.close()  # (or the next train() of a notebook)
    end = [json.loads(line) for line in open(cb.log_path)][-1]
    assert end["status"] == "crashed"
    ok = RLHFMonitorCallback(address=False, log_dir=str(tmp_path / "c"), analyze_checkpoints=False)
    ok.on_train_begin(args=None, state=None, control=None)
    ok.on_train_end(args=None, state=None, control=None)
    ok.close()
    end = [json.loads(line) for line in open(ok.log_path)][-1]
    assert "status" not in end and end["event"] == "run_end"  # a finished run's run_end is as before
