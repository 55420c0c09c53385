"""Keys as data and the user's config file (thresholds + keymap under $XDG_CONFIG_HOME)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from rlhf_tui.analysis.thresholds import Thresholds
from rlhf_tui.tui import keys
from rlhf_tui.tui.app import MonitorApp
from rlhf_tui.tui.config import (
    DETECTOR_SETTING,
    Config,
    ConfigError,
    config_path,
    load_config,
    save_config,
    setting_for,
    step_setting,
    toggle_mute,
)


def test_config_path_follows_xdg_config_home(tmp_path):
    assert config_path() == tmp_path / "xdg" / "rlhf-tui" / "config.toml"


def test_missing_config_is_empty_and_save_load_round_trips(tmp_path):
    config = load_config()
    assert config.thresholds == Thresholds() and config.keymap == {} and not config.path.exists()
    config.thresholds = step_setting(config.thresholds, "anomaly_threshold", 1)
    config.thresholds = toggle_mute(config.thresholds, "zscore")
    config.keymap = {"quit": "ctrl+q"}
    config.other = {"ui": {"theme": "nord"}}
    path = save_config(config)
    text = path.read_text()
    assert "anomaly_threshold = 4.5" in text and "kl_spike_factor" not in text  # only what differs
    again = load_config()
    assert again.thresholds.anomaly_threshold == 4.5 and again.thresholds.muted == ["zscore"]
    assert again.keymap == {"quit": "ctrl+q"} and again.other == {"ui": {"theme": "nord"}}
    assert toggle_mute(again.thresholds, "zscore").muted == []


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("[thresholds\n", "not valid TOML"),
        ("[thresholds]\nanomaly_threshold = 'high'\n", "anomaly_threshold"),
        ("[thresholds]\nno_such_setting = 1\n", "no_such_setting"),
        ("[keys]\nquit = 3\n", "[keys]"),
    ],
)
def test_bad_config_is_one_clear_error(content, fragment):
    path = config_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config()
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_a_bad_config_file_stops_the_monitor_with_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[thresholds]\nanomaly_threshold = -1\n")
    exe = os.path.join(os.path.dirname(sys.executable), "rlhf-tui")
    result = subprocess.run(
        [exe, "--config", str(bad), "tcp://127.0.0.1:5555"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "anomaly_threshold" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_step_setting_respects_bounds_and_types():
    th = Thresholds()
    assert step_setting(th, "grace_steps", 1).grace_steps == 15
    low = Thresholds(anomaly_threshold=0.5)
    assert step_setting(low, "anomaly_threshold", -1).anomaly_threshold == 0.5  # clamped at its minimum
    assert step_setting(th, "entropy_collapse_high", 1).entropy_collapse_high <= 1.0
    assert setting_for(None) == "anomaly_threshold" and setting_for("kl_spike") == "kl_spike_factor"


def test_every_detector_maps_to_a_real_setting():
    from rlhf_tui.analysis.detectors import DETECTORS

    fields = set(Thresholds().to_dict())
    assert set(DETECTOR_SETTING.values()) <= fields
    assert set(DETECTORS) - set(DETECTOR_SETTING) <= {"nonfinite"}


def test_bindings_are_declared_once_with_unique_ids():
    ids = [k.id for k in keys.KEYS]
    assert len(ids) == len(set(ids))
    for scope in keys.SCOPES:
        assert all(b.id for b in keys.bindings(scope))
        bound = [key for b in keys.bindings(scope) for key in b.key.split(",")]
        assert len(bound) == len(set(bound)), f"two bindings share a key in {scope}"
    assert {b.id for b in MonitorApp.BINDINGS if getattr(b, "id", None)} == {k.id for k in keys.keys_for("app")}


def test_readme_keys_section_is_the_generated_table():
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Keys", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    assert keys.markdown_table() in section


def test_docs_monitor_lists_every_binding_id():
    text = (REPO / "docs" / "monitor.md").read_text()
    for k in keys.KEYS:
        assert f"`{k.id}`" in text, k.id


def test_app_uses_the_config_file_and_thresholds_file_wins(tmp_path):
    path = config_path()
    path.parent.mkdir(parents=True)
    path.write_text('[thresholds]\nanomaly_threshold = 4.0\n[keys]\nquit = "x"\n')
    assert MonitorApp([], stores=[]).thresholds.anomaly_threshold == 4.0
    given = Thresholds(anomaly_threshold=6.0)
    assert MonitorApp([], stores=[], thresholds=given).thresholds is given
    app = MonitorApp([], stores=[], config=Config(Path(tmp_path / "other.toml")))
    assert app.thresholds == Thresholds()
