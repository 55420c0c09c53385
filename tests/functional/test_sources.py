"""Sources that need no callback, with real writers and no training: TensorBoard event files written by the
SummaryWriter transformers uses, a trainer_state.json rewritten by a writer thread, a trackio store, TRL's
completions parquet; truncated, corrupt, locked and mid-rewrite files."""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import struct
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for

from rlhf_tui.analysis.store import Store
from rlhf_tui.bridge.monitor import completions_source, tensorboard_source
from rlhf_tui.bridge.monitor.followed_source import FileFollower, follow_file_source, readers_for
from rlhf_tui.bridge.monitor.sources import SourceError, load_file_source
from rlhf_tui.bridge.monitor.tensorboard_source import RecordFile
from rlhf_tui.bridge.monitor.trainer_state_source import TrainerStateReader
from rlhf_tui.tui.cli import main

pytest.importorskip("tensorboard")
TAGS = ("loss", "kl", "reward", "grad_norm", "learning_rate")


def _value(tag: str, step: int) -> float:
    return {"loss": 0.5, "kl": 0.01 * step, "reward": 1.0 + 0.1 * step, "grad_norm": 1.0}.get(tag, 1e-5)


def tb_writer(log_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    writer.add_text("args", json.dumps({"max_steps": 30, "logging_steps": 1, "num_generations": 4}))
    return writer


def write_tb_steps(writer, steps, flush_each_tag: bool = False, skip: dict | None = None) -> None:
    """Scalars as transformers' TensorBoardCallback writes them: `train/<key>` per log, a flush after each log."""
    for step in steps:
        for tag in TAGS:
            if skip and tag in skip.get(step, ()):
                continue  # transformers drops a None value with a warning
            writer.add_scalar(f"train/{tag}", _value(tag, step), step)
            if flush_each_tag:
                writer.flush()
        writer.flush()


def event_file(log_dir: Path) -> Path:
    return next(log_dir.glob("events.out.tfevents.*"))


def test_tensorboard_dir_reads_as_canonical_names_with_eval_and_summary(tmp_path, capsys):
    log_dir = tmp_path / "out" / "runs" / "Jan01_host"
    writer = tb_writer(log_dir)
    write_tb_steps(writer, range(1, 21))
    writer.add_scalar("eval/loss", 0.7, 20)
    for key, value in (("train_runtime", 12.5), ("train_loss", 0.4), ("epoch", 1.0)):
        writer.add_scalar(f"train/{key}", value, 20)
    writer.close()
    assert main(["report", str(tmp_path / "out"), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 20 and report["run"]["run_id"] == "tb:runs/Jan01_host"
    assert {"loss", "kl", "reward", "grad_norm", "learning_rate", "eval_loss"} <= set(report["metrics"])
    assert not any(name.startswith("train/") for name in report["metrics"])
    assert report["metrics"]["reward"]["last"] == pytest.approx(3.0)
    assert report["summary"]["train_runtime"] == 12.5 and "train_runtime" not in report["metrics"]
    run = load_file_source(str(event_file(log_dir))).current_run  # the event file itself is a source too
    assert run.rows == 20 and run.meta["args"]["num_generations"] == 4 and run.meta["max_steps"] == 30


def test_a_metric_transformers_dropped_as_none_is_landed_as_none_and_found(tmp_path, capsys):
    log_dir = tmp_path / "runs" / "a"
    writer = tb_writer(log_dir)
    write_tb_steps(writer, range(1, 31), skip={s: ("reward",) for s in range(18, 31)})
    writer.close()
    run = load_file_source(str(tmp_path)).current_run
    assert run.logged("reward")[17:].all() and all(math.isnan(v) for v in run.values("reward")[17:])
    assert main(["report", str(tmp_path), "--format", "json"]) == 0
    anomalies = json.loads(capsys.readouterr().out)["anomalies"]
    assert any(a["detector"] == "nonfinite" and a["metric"] == "reward" and a["step"] == 18 for a in anomalies)


def _records(path: Path) -> list[tuple[int, int]]:
    """(offset, total length) of each record of an event file."""
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        out.append((pos, 16 + length))
        pos += 16 + length
    return out


def test_a_cut_off_record_is_retried_and_a_partial_step_never_shown(tmp_path):
    log_dir = tmp_path / "runs" / "a"
    writer = tb_writer(log_dir)
    write_tb_steps(writer, range(1, 11))
    writer.close()
    full = event_file(log_dir).read_bytes()
    records = _records(event_file(log_dir))
    cut = records[-2][0] + 7  # inside step 10's second-last scalar
    live = tmp_path / "live" / "runs" / "a"
    live.mkdir(parents=True)
    target = live / event_file(log_dir).name
    target.write_bytes(full[:cut])
    store = Store()
    follower = follow_file_source(str(tmp_path / "live"), store)
    follower.poll()
    run = store.current_run
    assert run.rows == 9 and run.last_step == 9  # step 10 is incomplete: held back, not shown
    with open(target, "ab") as fh:
        fh.write(full[cut:])
    os.utime(target, (time.time() - 5, time.time() - 5))  # the writer went quiet: its last step is whole
    follower.poll()
    assert run.rows == 10 and all(run.values(tag)[-1] == pytest.approx(_value(tag, 10)) for tag in TAGS)
    # a recorded read of a file killed mid-record: every whole step, and no partial last one
    target.write_bytes(full[:cut])
    assert load_file_source(str(target)).current_run.rows == 9


def test_a_corrupt_record_is_skipped_and_what_follows_is_read(tmp_path):
    log_dir = tmp_path / "runs" / "a"
    writer = tb_writer(log_dir)
    write_tb_steps(writer, range(1, 21))
    writer.close()
    path = event_file(log_dir)
    data = bytearray(path.read_bytes())
    records = _records(path)
    data_at, _ = records[len(records) // 3]
    data[data_at + 14] ^= 0xFF  # the data of a record in step ~7: its CRC fails
    head_at, _ = records[2 * len(records) // 3]
    data[head_at + 1] ^= 0x55  # a length in step ~14: framing lost until the next valid header
    path.write_bytes(bytes(data))
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

    stops_at = len(list(RawEventFileLoader(str(path)).Load()))
    assert stops_at < len(records) // 3 + 1  # tensorboard's own loader stops for good at the first bad record
    rf = RecordFile(path)
    got = rf.read()
    assert rf.corrupt == 2 and len(got) == len(records) - 2 and rf.whole
    run = load_file_source(str(tmp_path)).current_run
    assert run.last_step == 20 and run.rows == 20


def test_a_followed_event_file_lands_only_whole_steps_while_a_writer_appends(tmp_path):
    log_dir = tmp_path / "runs" / "a"
    writer = tb_writer(log_dir)
    store = Store()
    follower = FileFollower(str(tmp_path), readers_for(str(tmp_path)) or [], store, poll_s=0.005)
    seen_partial = []

    def check():
        with store.lock:
            run = store.current_run
            if run is not None and run.rows:
                row = {tag: run.values(tag)[-1] for tag in TAGS}
                if not all(math.isfinite(v) for v in row.values()):
                    seen_partial.append((run.last_step, row))

    follower.start()
    try:
        for step in range(1, 41):
            write_tb_steps(writer, [step], flush_each_tag=True)  # the worst case: a flush between tags
            check()
        writer.close()
        wait_for(lambda: store.current_run is not None and store.current_run.rows == 40, timeout=15)
    finally:
        follower.stop()
    assert not seen_partial and store.current_run.steps.tolist() == list(range(1, 41))


def test_a_missing_tensorboard_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    writer = tb_writer(tmp_path / "runs" / "a")
    write_tb_steps(writer, range(1, 4))
    writer.close()
    monkeypatch.setattr(tensorboard_source, "_event_proto", lambda: None)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'rlhf-tui[tensorboard]'" in err[0]


# -- trainer_state.json, rewritten at each checkpoint ------------------------------------------------------
def _state(steps: int, summary: bool = False) -> dict:
    history = [
        {"step": s, "loss": 0.5, "kl": 0.01 * s, "reward": 1.0 + s, "epoch": s / 100} for s in range(1, steps + 1)
    ]
    if summary:
        history.append({"step": steps, "train_runtime": 9.0, "train_loss": 0.5})
    return {"global_step": steps, "max_steps": 60, "logging_steps": 1, "log_history": history}


def _write_in_place(path: Path, text: str) -> None:
    """A non-atomic rewrite: truncated, then written in pieces (a reader can catch any prefix)."""
    with open(path, "w") as fh:
        for i in range(0, len(text), 512):
            fh.write(text[i : i + 512])
            fh.flush()
            time.sleep(0.0005)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.mark.parametrize("write", [_write_in_place, _write_atomically])
def test_a_rewritten_trainer_state_is_followed_by_whole_entries(tmp_path, write):
    out = tmp_path / "out"
    out.mkdir()
    (out / "trainer_state.json").write_text(json.dumps(_state(1), indent=2))
    store = Store()
    reader = TrainerStateReader(out)
    stop = threading.Event()
    partial = []

    def writer():
        for steps in range(2, 61):
            ckpt = out / f"checkpoint-{steps}"
            ckpt.mkdir(exist_ok=True)
            write(ckpt / "trainer_state.json", json.dumps(_state(steps, summary=steps == 60), indent=2))
            if steps > 3:  # save_total_limit: old checkpoints go, maybe while being read
                shutil.rmtree(out / f"checkpoint-{steps - 3}", ignore_errors=True)
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not stop.is_set() or reader.poll(store):
        reader.poll(store)
        run = store.current_run
        if run is not None and run.rows and not math.isfinite(run.values("reward")[-1]):
            partial.append(run.last_step)
    thread.join()
    reader.poll(store)
    run = store.current_run
    assert not partial and run.steps.tolist() == list(range(1, 61)) and run.out_of_order == 0
    assert run.values("reward").tolist() == [1.0 + s for s in range(1, 61)]
    assert reader.ended and run.summary["train_runtime"] == 9.0 and run.meta["max_steps"] == 60


def test_a_checkpoint_state_at_max_steps_ends_the_run_without_a_summary(tmp_path):
    """transformers saves the last checkpoint before it logs the end-of-training summary: a state whose
    global_step reached max_steps is the run's end (a follower waited for it forever), read once or followed."""
    out = tmp_path / "out"
    (out / "checkpoint-59").mkdir(parents=True)
    (out / "checkpoint-59" / "trainer_state.json").write_text(json.dumps(_state(59)))
    store = Store()
    reader = TrainerStateReader(out)
    assert reader.poll(store) == 59 and not reader.ended and store.current_run.ended is None
    (out / "checkpoint-60").mkdir()
    (out / "checkpoint-60" / "trainer_state.json").write_text(json.dumps(_state(60)))
    assert reader.poll(store) == 1 and reader.ended and store.current_run.ended == {"global_step": 60}
    state_file = out / "checkpoint-60" / "trainer_state.json"
    assert load_file_source(str(state_file)).current_run.ended == {"global_step": 60}  # the file itself, read once
    assert load_file_source(str(out / "checkpoint-59" / "trainer_state.json")).current_run.ended is None


def test_a_trainer_state_caught_mid_rewrite_is_retried_never_a_crash(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-5").mkdir(parents=True)
    text = json.dumps(_state(5), indent=2)
    (out / "checkpoint-5" / "trainer_state.json").write_text(text[: len(text) // 2])
    with pytest.raises(SourceError, match="cannot be read whole yet"):
        load_file_source(str(out))
    store = Store()
    reader = TrainerStateReader(out)
    assert reader.poll(store) == 0 and reader.retries == 1
    (out / "checkpoint-5" / "trainer_state.json").write_text(text)
    assert reader.poll(store) == 5 and store.current_run.run_id == "file:out"


# -- trackio ----------------------------------------------------------------------------------------------
def _trackio_db(path: Path, journal: str = "WAL") -> sqlite3.Connection:
    """trackio's tables as its SQLiteStorage makes them (init_db), written like trackio writes them."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA journal_mode = {journal}")
    conn.execute(
        "CREATE TABLE metrics (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, timestamp TEXT NOT NULL,"
        " run_name TEXT NOT NULL, step INTEGER NOT NULL, metrics TEXT NOT NULL)"
    )
    conn.execute(
        "CREATE TABLE configs (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, run_name TEXT NOT NULL,"
        " config TEXT NOT NULL, created_at TEXT NOT NULL, UNIQUE(run_id))"
    )
    conn.execute(
        "INSERT INTO configs (run_id, run_name, config, created_at) VALUES ('r1', 'run-a', ?, 'now')",
        (json.dumps({"max_steps": 20, "num_generations": 4, "_Username": "x"}),),
    )
    return conn


def _log(conn: sqlite3.Connection, step: int, metrics: dict) -> None:
    conn.execute(
        "INSERT INTO metrics (run_id, timestamp, run_name, step, metrics) VALUES ('r1', 'now', 'run-a', ?, ?)",
        (step - 1, json.dumps({**metrics, "train/global_step": step})),
    )


def test_a_trackio_project_reads_and_follows_and_survives_a_writer_lock(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    (tmp_path / "trackio").mkdir()
    conn = _trackio_db(tmp_path / "trackio" / "proj.db", journal="DELETE")
    for step in range(1, 11):
        _log(conn, step, {"train/loss": 0.5, "train/kl": 0.01, "train/reward": "NaN" if step == 9 else 1.0})
    assert main(["report", "trackio:proj", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 10 and report["run"]["run_id"] == "trackio:proj/run-a"
    assert {"loss", "kl", "reward"} <= set(report["metrics"])
    assert any(a["detector"] == "nonfinite" and a["step"] == 9 for a in report["anomalies"])
    follower = follow_file_source(str(tmp_path / "trackio"))
    assert follower.poll() == 10
    conn.execute("BEGIN EXCLUSIVE")  # the writer holds the database: a reader is refused for now
    _log(conn, 11, {"train/loss": 0.5, "train/reward": 1.0})
    reader = follower.readers[0]
    assert follower.poll() == 0 and reader.retries == 1 and follower.error is None
    conn.execute("COMMIT")
    for step in range(12, 21):
        _log(conn, step, {"train/loss": 0.5, "train/reward": 1.0})
    assert follower.poll() == 10 and follower.store.current_run.last_step == 20
    assert follower.ended and follower.store.connection == "ended"  # the config's max_steps reached


def test_a_trackio_project_whose_database_has_no_table_yet_is_followed(tmp_path, monkeypatch):
    """trackio creates its database file before its tables: a source named `trackio:PROJECT` is that project
    from its first look (it was once taken for some other file, refused, and never followed)."""
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    (tmp_path / "trackio").mkdir()
    db = tmp_path / "trackio" / "proj.db"
    sqlite3.connect(db).execute("PRAGMA user_version = 1").connection.close()  # a SQLite file, no table yet
    follower = follow_file_source("trackio:proj")
    assert follower is not None and type(follower.readers[0]).__name__ == "TrackioReader"
    assert follower.poll() == 0 and follower.readers[0].retries == 1 and not follower.ended
    conn = _trackio_db(db)
    for step in range(1, 21):
        _log(conn, step, {"train/loss": 0.5, "train/reward": 1.0})
    assert follower.poll() == 20 and follower.ended and follower.store.current_run.run_id == "trackio:proj/run-a"


# -- TRL's completions parquet ----------------------------------------------------------------------------
def test_completions_parquet_land_as_reward_batches_and_a_cut_file_waits(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    writer = tb_writer(tmp_path / "runs" / "a")
    write_tb_steps(writer, range(1, 6))
    writer.close()
    (tmp_path / "completions").mkdir()
    for step in range(1, 6):
        scores = [float("nan")] * 4 if step == 5 else [0.1 * i + step for i in range(4)]
        table = {
            "step": [step] * 4,
            "prompt": [f"prompt {i}" for i in range(4)],
            "completion": [f"completion {i}" for i in range(4)],
            "length_reward": scores,
            "advantage": [0.0] * 4,
        }
        pd.DataFrame(table).to_parquet(tmp_path / "completions" / f"completions_{step:05d}.parquet")
    cut = tmp_path / "completions" / "completions_00006.parquet"
    whole = (tmp_path / "completions" / "completions_00005.parquet").read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    store = Store()
    follower = follow_file_source(str(tmp_path), store)
    follower.poll()
    run = store.current_run
    assert [b["step"] for b in run.rewards] == [1, 2, 3, 4, 5]
    assert run.rewards[0]["samples"][0] == {
        "label": "best",
        "index": 3,
        "score": pytest.approx(1.3),
        "prompt": "prompt 3",
        "completion": "completion 3",
    }
    # the completions browser holds every row of a file, each with its score (a small file is kept whole)
    rows = sorted(run.samples.rows(1), key=lambda r: r["index"])
    assert [(r["completion"], r["scores"]["length_reward"]) for r in rows] == [
        (f"completion {i}", pytest.approx(0.1 * i + 1)) for i in range(4)
    ]
    reader = follower.readers[-1]
    assert reader.corrupt == 0 and "completions_00006.parquet" not in reader.done  # being written: retried
    report_run = load_file_source(str(tmp_path)).current_run
    from rlhf_tui.analysis.reward_report import run_reward_episodes

    found = run_reward_episodes(report_run)
    assert any(a["detector"] == "reward_invalid" and a["step"] == 5 for a in found)


def test_without_pyarrow_the_completions_are_one_note(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    (tmp_path / "completions").mkdir()
    (tmp_path / "completions" / "completions_00001.parquet").write_bytes(b"PAR1")
    writer = tb_writer(tmp_path / "runs" / "a")
    write_tb_steps(writer, range(1, 3))
    writer.close()
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    store = load_file_source(str(tmp_path))
    assert list(store.rejections).count(completions_source.INSTALL_HINT) == 1 and store.current_run.rows == 2
