"""A JSONL log read as it grows (tui/follow.JsonlTail): only whole lines land, a line being written waits for its
newline, an overlong line is dropped without being buffered, a rewritten log starts over."""

import json

from rlhf_tui.bridge.training.jsonl_log import JsonlLog
from rlhf_tui.tui import follow
from rlhf_tui.tui.follow import JsonlTail


def _line(step: int) -> bytes:
    return json.dumps({"event": "step_end", "step": step, "ppo_metrics": {"loss": 1.0 / step}}).encode() + b"\n"


def test_only_whole_lines_land_and_a_line_being_written_waits(tmp_path):
    log = JsonlLog(tmp_path, "t1")
    log.write({"event": "run_start", "run_id": "t1", "trainer": "GRPOTrainer"})
    log.close()
    tail = JsonlTail(log.path)
    tail.poll()
    with open(log.path, "ab") as fh:
        fh.write(_line(1) + _line(2)[:20])  # step 2 half written
    tail.poll()
    run = tail.store.current_run
    assert run.run_id == "t1" and run.rows == 1 and tail.store.transport["rejected"] == 0
    with open(log.path, "ab") as fh:
        fh.write(_line(2)[20:] + b"{not json\n")
    tail.poll()
    assert run.rows == 2 and list(run.steps) == [1, 2] and tail.store.transport["rejected"] == 1
    tail.stop()


def test_an_overlong_line_is_dropped_unbuffered_and_a_rewritten_log_starts_over(tmp_path, monkeypatch):
    monkeypatch.setattr(follow, "MAX_LINE", 1000)
    monkeypatch.setattr(follow, "MAX_READ", 600)
    path = tmp_path / "run-t2.jsonl"
    path.write_bytes(_line(1) + b'{"event": "step_end", "junk": "' + b"x" * 5000 + b'"}\n' + _line(2))
    tail = JsonlTail(path)
    while tail.poll():  # 600 bytes a look: the backlog over several
        assert len(tail._partial) <= 1000 + 600
    tail.poll()
    run = tail.store.current_run
    assert list(run.steps) == [1, 2] and tail.store.transport["rejected"] == 1
    first = tail.store
    path.write_bytes(_line(7))  # rewritten (shorter): read again from its start into a new store
    tail.poll()
    assert tail.store is not first and list(tail.store.current_run.steps) == [7]
    tail.stop()
