"""Detector settings as data: defaults, dict/TOML round trips, clear one-line errors, the editor's field table."""

from __future__ import annotations

import dataclasses

import pytest

from rlhf_tui.analysis.detectors import DETECTORS
from rlhf_tui.analysis.thresholds import THRESHOLD_FIELDS, Thresholds, load_thresholds, save_thresholds


def test_defaults_keep_the_seeds_name_and_hygiene_settings():
    th = Thresholds()
    assert th.anomaly_threshold == 4.0
    assert th.grace_steps >= 0 and th.cooldown_steps >= 0 and th.muted == []
    assert th.block_steps * th.baseline_blocks >= th.min_history


def test_dict_round_trip_and_replace():
    th = Thresholds(anomaly_threshold=4.0, muted=["zscore"])
    assert Thresholds.from_dict(th.to_dict()) == th
    assert th.replace(grace_steps=3).grace_steps == 3 and th.grace_steps == Thresholds().grace_steps
    assert Thresholds.from_dict({"kl_runaway_factor": 20}).kl_runaway_factor == 20.0  # int for float is fine
    assert Thresholds.from_dict({}) == Thresholds()


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"anomaly_treshold": 3.0}, "unknown threshold setting 'anomaly_treshold'"),
        ({"anomaly_threshold": "high"}, "'anomaly_threshold' must be float"),
        ({"grace_steps": 2.5}, "'grace_steps' must be int"),
        ({"grace_steps": True}, "'grace_steps' must be int"),
        ({"muted": "zscore"}, "'muted' must be a list"),
        ({"anomaly_threshold": float("nan")}, "finite"),
        ({"entropy_collapse_frac": 1.5}, "'entropy_collapse_frac' must be <= 1.0"),
        ({"block_steps": 1}, "'block_steps' must be >= 2"),
    ],
)
def test_bad_values_give_one_clear_line(data, needle):
    with pytest.raises(ValueError) as err:
        Thresholds.from_dict(data)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_toml_round_trip(tmp_path):
    th = Thresholds(anomaly_threshold=2.5, cooldown_steps=4, muted=["kl_spike", "zscore"])
    path = tmp_path / "conf" / "thresholds.toml"
    save_thresholds(th, path)
    assert load_thresholds(path) == th
    text = path.read_text()
    assert "anomaly_threshold = 2.5" in text


def test_toml_partial_table_and_errors(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text("[thresholds]\nshift_h = 7.5\n")
    assert load_thresholds(p) == Thresholds(shift_h=7.5)
    p.write_text("shift_h = 7.5\nbogus = 1\n")
    with pytest.raises(ValueError, match=r"t\.toml: unknown threshold setting 'bogus'"):
        load_thresholds(p)
    p.write_text("shift_h = [\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_thresholds(p)
    with pytest.raises(ValueError, match="cannot read thresholds file"):
        load_thresholds(tmp_path / "missing.toml")


def test_field_table_describes_every_setting_for_an_editor():
    names = [f.name for f in dataclasses.fields(Thresholds)]
    assert [f["name"] for f in THRESHOLD_FIELDS] == names
    defaults = Thresholds()
    for spec in THRESHOLD_FIELDS:
        assert spec["default"] == getattr(defaults, spec["name"])
        assert spec["help"] and isinstance(spec["step"], (int, float)) and spec["type"] in ("int", "float", "list")
        if spec["type"] != "list":
            bumped = defaults.replace(**{spec["name"]: spec["default"] + spec["step"]})
            assert getattr(bumped, spec["name"]) != spec["default"]


def test_muted_names_are_detector_names():
    th = Thresholds(muted=list(DETECTORS)[:2])
    assert all(th.is_muted(name) for name in th.muted)
