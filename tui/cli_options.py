"""The command line's words: `rlhf-tui`'s argument parsers and the checks of what was given (numbers in range,
alert options, CURVE key files, thresholds files, muted detector names, live addresses).

A value a user got wrong is a `CliError`: one line on stderr, exit 2 (tui/cli.py runs the commands).
"""

from __future__ import annotations

import argparse
import math
import os

from rlhf_tui.analysis.severity import Severity

EXIT_OK, EXIT_ANOMALY, EXIT_USAGE = 0, 1, 2
DEFAULT_SOURCE = "tcp://127.0.0.1:5555"
ADDRESS_ENV = "RLHF_TUI_ADDRESS"  # the training side's variable too (bridge/training/publisher.py)
REPORT_WIDTHS = (40, 1000)  # narrower than 40 columns the tables no longer fit; wider is a typo
MAX_DEMO_STEPS = 100_000  # the demo builds a prompt list of steps × 4 rows

MAIN_HELP = """\
Terminal live monitor for RLHF training (TRL GRPO, RLOO, DPO, PPO).

usage:
  rlhf-tui [monitor] [SOURCE ...] [options]    live monitor
  rlhf-tui demo [--steps N] [--headless]
  rlhf-tui report SOURCE [--format text|markdown|json] [-o FILE] [--wait-steps N] [--timeout S] [--fail-on LEVEL]
  rlhf-tui report SOURCE --follow [ALERT OPTIONS] [--timeout S] [--fail-on LEVEL]   alarms as lines until the run ends
  rlhf-tui backtest RUN... [--thresholds FILE] [--level LEVEL] [--format text|json] [-o FILE]
  rlhf-tui analyze-checkpoint PATH [--reference PATH] [--format text|json]
  rlhf-tui keygen DIR                CURVE keys for remote attach (docs/security.md)

SOURCE: tcp://HOST:PORT or ipc://PATH (a live run), a JSONL log written by the callback,
a trainer_state.json, a training output_dir, a TensorBoard log dir or event file, or a trackio
project (trackio:PROJECT or its .db); files are followed as they grow (docs/sources.md). The live
monitor without SOURCE watches $RLHF_TUI_ADDRESS when it is set, else tcp://127.0.0.1:5555 (SOURCE on
the command line > $RLHF_TUI_ADDRESS > the default). Run `rlhf-tui COMMAND --help` for a command's options.
ALERT OPTIONS (the monitor and `report --follow`; docs/alerts.md): --alert-level LEVEL, --on-alert CMD,
--alert-timeout S, --alert-rate N, --bell, --notify, --webhook URL.
"""


class CliError(Exception):
    """A user error: printed as one line, exit 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage block too)
        raise CliError(f"{self.prog}: {message}")


def int_option(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high], else one line naming the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else ("positive" if low == 1 else f">= {low}")
            raise argparse.ArgumentTypeError(f"must be {bound} (got {value})")
        return value

    return parse


def seconds_option(allow_zero: bool = False):
    """An argparse type: a finite number of seconds, > 0 (or >= 0 with `allow_zero`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>= 0' if allow_zero else '> 0'} (got {text})")
        return value

    return parse


def add_level_option(p, flag: str, help: str, default: str | None = None) -> None:
    """A severity option (`--fail-on`, `--alert-level`, backtest's `--level`): one of Severity's names, shown as LEVEL."""
    p.add_argument(flag, choices=Severity.names(), metavar="LEVEL", default=default, help=help)


def add_key_options(p: argparse.ArgumentParser) -> None:
    """CURVE options of a monitor (live monitor and report): see docs/security.md."""
    p.add_argument("--server-key", metavar="FILE", help="the run's public CURVE key (server.key)")
    p.add_argument("--client-key", metavar="FILE", help="this monitor's CURVE key pair (client.key_secret)")
    p.add_argument("--keys-dir", metavar="DIR", help="DIR/server.key + DIR/client.key_secret")


def add_alert_options(p: argparse.ArgumentParser) -> None:
    """Alerts out for new episodes (the live monitor and `report --follow`): see docs/alerts.md."""
    g = p.add_argument_group("alerts (docs/alerts.md)")
    add_level_option(
        g, "--alert-level", "alert on new episodes of LEVEL (low|medium|high|critical) or worse (default medium)"
    )
    g.add_argument(
        "--on-alert",
        metavar="CMD",
        help="run CMD (split like a shell would, run without one) per new episode: its JSON on stdin, "
        "RLHF_TUI_RUN_ID/SEVERITY/DETECTOR/METRIC/STEP/MESSAGE in the environment",
    )
    g.add_argument(
        "--alert-timeout",
        type=seconds_option(),
        metavar="S",
        help="kill an --on-alert command after S seconds (default 10)",
    )
    g.add_argument(
        "--alert-rate",
        type=int_option(1),
        metavar="N",
        help="send at most N alerts a minute; the rest are counted (default 10)",
    )
    g.add_argument("--bell", action="store_true", help="ring the terminal bell per alert")
    g.add_argument("--notify", action="store_true", help="a desktop notification per alert (notify-send)")
    g.add_argument(
        "--webhook",
        metavar="URL",
        help='POST each alert as Slack/Discord JSON ({"text": ..., "content": ...}) to URL',
    )


def alert_options(ns, follow: bool = True):
    """The AlertOptions the alert flags ask for (None when none is given); a bad value is a CliError."""
    from rlhf_tui.tui.alerts import DEFAULT_COMMAND_TIMEOUT, DEFAULT_LEVEL, DEFAULT_RATE, AlertOptions

    given = [ns.alert_level, ns.on_alert, ns.alert_timeout, ns.alert_rate, ns.webhook]
    if not follow:
        if any(v is not None for v in given) or ns.bell or ns.notify:
            raise CliError("the alert options (--on-alert, --webhook, --bell, ...) need --follow")
        return None
    options = AlertOptions(
        level=ns.alert_level or DEFAULT_LEVEL,
        command=ns.on_alert,
        command_timeout=ns.alert_timeout or DEFAULT_COMMAND_TIMEOUT,
        rate=ns.alert_rate or DEFAULT_RATE,
        bell=ns.bell,
        notify=ns.notify,
        webhook=ns.webhook,
    )
    from rlhf_tui.tui.alerts import check_webhook, parse_command

    try:
        if options.command is not None:
            parse_command(options.command)
        if options.webhook is not None:
            check_webhook(options.webhook)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return options


def curve_option(ns):
    if not (ns.server_key or ns.client_key or ns.keys_dir):
        return None
    from rlhf_tui.bridge.wire.security import SecurityError, client_from_options

    try:
        return client_from_options(ns.server_key, ns.client_key, ns.keys_dir)
    except SecurityError as exc:
        raise CliError(str(exc)) from None


def keygen_parser() -> argparse.ArgumentParser:
    p = Parser(prog="rlhf-tui keygen", description="Create CURVE keys for remote attach (docs/security.md).")
    p.add_argument("dir", metavar="DIR")
    return p


def monitor_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="rlhf-tui",
        description=MAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=argparse.SUPPRESS,
    )
    p.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help=f"what to monitor (default ${ADDRESS_ENV} when set, else {DEFAULT_SOURCE})",
    )
    p.add_argument("--thresholds", metavar="FILE", help="load detector thresholds from a TOML file")
    p.add_argument(
        "--snapshot-dir",
        metavar="DIR",
        help="where the snapshot keys write reports (default: the working directory)",
    )
    p.add_argument(
        "--ssh",
        metavar="USER@HOST",
        help="open the SSH port-forward(s) for tcp:// sources with the system ssh (closed on exit)",
    )
    p.add_argument(
        "--ssh-timeout",
        metavar="S",
        type=seconds_option(),
        default=20.0,
        help="seconds to wait for each SSH port-forward (default %(default)s)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="config file (default $XDG_CONFIG_HOME/rlhf-tui/config.toml): thresholds and [keys]",
    )
    add_key_options(p)
    add_alert_options(p)
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def report_parser() -> argparse.ArgumentParser:
    p = Parser(prog="rlhf-tui report", description="Headless report of a source (same view as the snapshot key).")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument(
        "--follow",
        action="store_true",
        help="keep following a live address, a growing log, an output_dir, a TensorBoard log or a trackio project "
        "until its run ends (or --timeout, Ctrl-C, SIGTERM), printing each new alarm as a line (a path not there "
        "yet is waited for); the report only with --format or -o",
    )
    p.add_argument("--format", choices=("text", "markdown", "json"), help="default text")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.add_argument(
        "--wait-steps",
        type=int_option(1),
        metavar="N",
        help="live source: wait until N steps have arrived (default: until the history is in)",
    )
    p.add_argument(
        "--timeout",
        type=seconds_option(),
        metavar="S",
        help="live source: give up waiting after S seconds (default 10; with --follow: no limit)",
    )
    add_level_option(p, "--fail-on", "exit 1 if an anomaly of LEVEL (low|medium|high|critical) or worse was found")
    p.add_argument("--thresholds", metavar="FILE", help="detector thresholds (TOML)")
    p.add_argument(
        "--width",
        type=int_option(*REPORT_WIDTHS),
        metavar="N",
        default=110,
        help=f"text width of the text/markdown report, {REPORT_WIDTHS[0]} to {REPORT_WIDTHS[1]} (default %(default)s)",
    )
    add_key_options(p)
    add_alert_options(p)
    return p


def demo_parser() -> argparse.ArgumentParser:
    p = Parser(prog="rlhf-tui demo", description="Run a real tiny TRL GRPO training and monitor it live.")
    p.add_argument(
        "--steps",
        type=int_option(1, MAX_DEMO_STEPS),
        default=300,
        help=f"training steps, 1 to {MAX_DEMO_STEPS} (default %(default)s)",
    )
    p.add_argument("--headless", action="store_true", help="no TUI: print the text report when training ends")
    p.add_argument(
        "--step-delay",
        type=seconds_option(allow_zero=True),
        help="seconds to sleep per step so the run is watchable (default 0.1 live, 0 headless)",
    )
    p.add_argument(
        "--save-steps",
        type=int_option(1),
        default=50,
        help="save (and analyse) a checkpoint every N steps (default %(default)s)",
    )
    p.add_argument("--format", choices=("text", "markdown", "json"), default="text", help="headless report format")
    return p


def checkpoint_parser() -> argparse.ArgumentParser:
    p = Parser(prog="rlhf-tui analyze-checkpoint", description="Health, weight statistics and drift of a checkpoint.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--reference", metavar="PATH", help="reference checkpoint for drift")
    p.add_argument("--step", type=int_option(0), help="the training step to label the result with")
    p.add_argument("--format", choices=("text", "json"), default="text")
    return p


def thresholds_option(path: str | None, default=True):
    from rlhf_tui.analysis.thresholds import Thresholds, load_thresholds

    if not path:
        return Thresholds() if default else None
    if not os.path.isfile(path):
        raise CliError(f"thresholds file not found: {path}")
    try:
        thresholds = load_thresholds(path)
    except (ValueError, OSError) as exc:
        raise CliError(str(exc).splitlines()[0]) from None  # the message names the file
    check_muted(thresholds.muted, f"thresholds file {path}: muted")
    return thresholds


def check_muted(names, where: str) -> None:
    """Refuse a muted detector name no detector has (a typo would silently mute nothing)."""
    import difflib

    from rlhf_tui.analysis.detectors.registry import REGISTRY
    from rlhf_tui.analysis.safe_text import safe_name

    for name in names:
        if name not in REGISTRY:
            close = difflib.get_close_matches(name, list(REGISTRY), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "the detectors are listed in docs/anomaly-detection.md"
            raise CliError(f"{where}: unknown detector {safe_name(name, 60)!r} ({hint})")


def check_live_address(source: str) -> None:
    if source.startswith("tcp://"):
        rest = source[len("tcp://") :]
        host, _, port = rest.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise CliError(f"bad address {source!r}: expected tcp://HOST:PORT")
    elif source.startswith("ipc://") and len(source) <= len("ipc://"):
        raise CliError(f"bad address {source!r}: expected ipc://PATH")
