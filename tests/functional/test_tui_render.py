"""The one renderer: untrusted text escaped, and the snapshot key writes exactly what `rlhf-tui report` prints."""

import pytest
from conftest import pilot_wait_for

from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
from rlhf_tui.tui.app import MonitorApp
from rlhf_tui.tui.cli import main
from rlhf_tui.tui.render import clean, render_markdown, render_text
from rlhf_tui.tui.widgets.model import view_report


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("plain", "plain"),
        ("\x1b[31mred\x1b[0m", "red"),
        ("\x1b]0;title\x07after", "after"),
        ("a\x00b\x07c\x9b31md", "abcd"),  # 8-bit CSI: the whole sequence goes, as a terminal would read it
        ("\x1bP1$r\x1b\\x\x1b]52;c;aGk=\x07y\x1b", "xy"),  # DCS, OSC 52 (clipboard), a lone ESC
        ("line1\nline2\r\nline3", "line1 line2 line3"),
        ("[bold]markup[/bold]", "[bold]markup[/bold]"),
        ("evil\u202etxt.exe", "eviltxt.exe"),
    ],
)
def test_clean_removes_control_sequences_and_keeps_text(raw, shown):
    assert clean(raw) == shown


def test_clean_clips_long_text():
    assert clean("x" * 500, limit=10) == "x" * 10 + "…"


def test_text_report_has_every_section_and_no_escape_sequences(make_store, run_id):
    store = make_store()
    with store.lock:
        report = view_report(store, None, spark_width=20)
    text = render_text(report, width=110, stamp=False)
    for section in (
        "Metrics",
        "Anomalies",
        "GPU / system",
        "Checkpoints",
        "Rewards",
        "Reward samples",
        "Transport",
        run_id,
        "▁",
    ):
        assert section in text, section
    assert "[red]forty-two[/red]" in text and "\x1b" not in text and "pwned" not in text
    assert "(snapshot" not in text
    markdown = render_markdown(report)
    assert markdown.startswith(f"# rlhf-tui report: {run_id}") and "```text" in markdown


def test_no_gpu_and_empty_sections_are_stated(make_store):
    store = make_store(gpu=False)
    with store.lock:
        report = view_report(store, None)
    assert "no GPU (CPU-only run)" in render_text(report)


async def test_snapshot_key_writes_the_same_view_as_the_report_command(tmp_path, capsys, injection, settle):
    cb = RLHFMonitorCallback(
        address=False, log_dir=str(tmp_path / "logs"), analyze_checkpoints=False, run_id="same-view"
    )
    for step in range(1, 61):
        cb.log_step(
            step,
            {
                "kl": 0.01 + (1.0 if step == 40 else 0.0),
                "reward": 0.02 * step,
                "loss": 0.5,
                "entropy": 2.0 - 0.01 * step,
            },
        )
    cb.log_rewards(60, [0.1, 0.4, 0.9], [{"label": "best", "score": 0.9, "prompt": "q", "completion": injection}])
    cb.close()
    assert main(["report", cb.log_path]) == 0
    printed = capsys.readouterr().out
    app = MonitorApp([cb.log_path], snapshot_dir=str(tmp_path / "snaps"))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, app)
        await pilot.press("s")
        await pilot_wait_for(pilot, lambda: app.last_snapshot is not None, message="snapshot")
    written = open(app.last_snapshot, encoding="utf-8").read()

    def body(text: str) -> str:
        return text.rsplit("(snapshot", 1)[0]

    assert body(written) == body(printed)
    assert "kl_spike" in written and "same-view" in written and "[red]forty-two[/red]" in written
