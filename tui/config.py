"""The user's config file: `$XDG_CONFIG_HOME/rlhf-tui/config.toml` (via platformdirs).

Two tables: `[thresholds]` (detector settings that differ from the defaults, written by the monitor whenever the
user changes one) and `[keys]` (binding id → key, applied with Textual's `set_keymap`). Unknown tables are kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_tui.analysis.detectors import REGISTRY, setting_of
from rlhf_tui.analysis.thresholds import THRESHOLD_FIELDS, Thresholds, read_toml

APP_NAME = "rlhf-tui"

# The setting that +/- changes when an anomaly of this detector has focus (z-score threshold otherwise): the first
# setting of the detector's registry record.
DETECTOR_SETTING: dict[str, str] = {name: d.settings[0] for name, d in REGISTRY.items() if d.settings}
FIELD_SPECS = {spec["name"]: spec for spec in THRESHOLD_FIELDS}


class ConfigError(ValueError):
    """The config file cannot be used; the message is one line naming the file."""


def config_path() -> Path:
    """`$XDG_CONFIG_HOME/rlhf-tui/config.toml` (platformdirs honours XDG_CONFIG_HOME; ~/.config otherwise)."""
    try:
        from platformdirs import user_config_dir

        return Path(user_config_dir(APP_NAME, appauthor=False)) / "config.toml"
    except ImportError:  # pragma: no cover - platformdirs is a dependency
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        return Path(base) / APP_NAME / "config.toml"


@dataclass
class Config:
    path: Path
    thresholds: Thresholds = field(default_factory=Thresholds)
    keymap: dict[str, str] = field(default_factory=dict)
    other: dict[str, Any] = field(default_factory=dict)  # tables we do not know, written back unchanged


def load_config(path: str | Path | None = None) -> Config:
    """Read the config file; a missing file is an empty config. Bad content raises ConfigError."""
    path = Path(path) if path else config_path()
    if not path.is_file():
        return Config(path)
    try:
        data = read_toml(path, "config file")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    raw_th = data.pop("thresholds", {})
    raw_keys = data.pop("keys", {})
    try:
        thresholds = Thresholds.from_dict(raw_th)
    except ValueError as exc:
        raise ConfigError(f"config file {path}: [thresholds] {exc}") from None
    if not isinstance(raw_keys, dict) or not all(isinstance(v, str) and v.strip() for v in raw_keys.values()):
        raise ConfigError(f'config file {path}: [keys] must map binding ids to key strings, e.g. quit = "q"')
    return Config(path, thresholds, {str(k): v.strip() for k, v in raw_keys.items()}, data)


def changed_settings(thresholds: Thresholds) -> dict[str, Any]:
    """The settings that differ from the defaults (what the config file stores)."""
    default = Thresholds().to_dict()
    return {k: v for k, v in thresholds.to_dict().items() if v != default.get(k)}


def save_config(config: Config) -> Path:
    """Write the config file atomically (thresholds that differ from the defaults, keys, other tables)."""
    import tomli_w

    data: dict[str, Any] = dict(config.other)
    data["thresholds"] = changed_settings(config.thresholds)
    if config.keymap:
        data["keys"] = dict(config.keymap)
    path = config.path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(
            b"# rlhf-tui settings: written by the monitor when you change a threshold (t, +/-, m).\n"
            b"# [keys] remaps bindings by id (see `?` in the monitor or docs/monitor.md).\n"
        )
        tomli_w.dump(data, fh)
    os.replace(tmp, path)
    return path


def setting_for(detector: str | None) -> str:
    return setting_of(detector)


def step_setting(thresholds: Thresholds, name: str, direction: int) -> Thresholds:
    """The thresholds with one setting moved by its +/- step, clamped to its bounds."""
    spec = FIELD_SPECS[name]
    value = getattr(thresholds, name)
    new = value + direction * spec["step"]
    if "min" in spec:
        new = max(new, spec["min"])
    if "max" in spec:
        new = min(new, spec["max"])
    if spec.get("type") == "int" or isinstance(value, int):
        new = int(round(new))
    else:
        new = round(float(new), 10)
    return thresholds.replace(**{name: new})


def toggle_mute(thresholds: Thresholds, detector: str) -> Thresholds:
    muted = list(thresholds.muted)
    if detector in muted:
        muted.remove(detector)
    else:
        muted.append(detector)
    return thresholds.replace(muted=sorted(muted))


def parse_value(name: str, text: str) -> Any:
    """A typed value for a setting from what the user typed (ValueError with a short message)."""
    spec = FIELD_SPECS[name]
    text = text.strip()
    if spec.get("type") == "int":
        try:
            return int(float(text))
        except ValueError:
            raise ValueError(f"{name} needs a whole number") from None
    if spec.get("type") == "list":
        return [part.strip() for part in text.split(",") if part.strip()]
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name} needs a number") from None
