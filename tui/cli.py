"""`rlhf-tui` command line: the live monitor, `demo`, `report`, `backtest` (tui/backtest.py), `analyze-checkpoint`.

Errors a user can cause print one line on stderr and exit 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from rlhf_tui.analysis.report import build_report, worst_severity
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


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage block too)
        raise CliError(f"{self.prog}: {message}")


def _int_option(low: int, high: int | None = None):
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


def _seconds_option(allow_zero: bool = False):
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


def _add_key_options(p: argparse.ArgumentParser) -> None:
    """CURVE options of a monitor (live monitor and report): see docs/security.md."""
    p.add_argument("--server-key", metavar="FILE", help="the run's public CURVE key (server.key)")
    p.add_argument("--client-key", metavar="FILE", help="this monitor's CURVE key pair (client.key_secret)")
    p.add_argument("--keys-dir", metavar="DIR", help="DIR/server.key + DIR/client.key_secret")


def _add_alert_options(p: argparse.ArgumentParser) -> None:
    """Alerts out for new episodes (the live monitor and `report --follow`): see docs/alerts.md."""
    g = p.add_argument_group("alerts (docs/alerts.md)")
    g.add_argument(
        "--alert-level",
        choices=Severity.names(),
        metavar="LEVEL",
        default=None,
        help="alert on new episodes of LEVEL (low|medium|high|critical) or worse (default medium)",
    )
    g.add_argument(
        "--on-alert",
        metavar="CMD",
        default=None,
        help="run CMD (split like a shell would, run without one) per new episode: its JSON on stdin, "
        "RLHF_TUI_RUN_ID/SEVERITY/DETECTOR/METRIC/STEP/MESSAGE in the environment",
    )
    g.add_argument(
        "--alert-timeout",
        type=_seconds_option(),
        metavar="S",
        default=None,
        help="kill an --on-alert command after S seconds (default 10)",
    )
    g.add_argument(
        "--alert-rate",
        type=_int_option(1),
        metavar="N",
        default=None,
        help="send at most N alerts a minute; the rest are counted (default 10)",
    )
    g.add_argument("--bell", action="store_true", help="ring the terminal bell per alert")
    g.add_argument("--notify", action="store_true", help="a desktop notification per alert (notify-send)")
    g.add_argument(
        "--webhook",
        metavar="URL",
        default=None,
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


def _curve(ns):
    if not (ns.server_key or ns.client_key or ns.keys_dir):
        return None
    from rlhf_tui.bridge.wire.security import SecurityError, client_from_options

    try:
        return client_from_options(ns.server_key, ns.client_key, ns.keys_dir)
    except SecurityError as exc:
        raise CliError(str(exc)) from None


def _keygen_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rlhf-tui keygen", description="Create CURVE keys for remote attach (docs/security.md).")
    p.add_argument("dir", metavar="DIR")
    return p


def _monitor_parser() -> argparse.ArgumentParser:
    p = _Parser(
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
        default=None,
        help="where the snapshot keys write reports (default: the working directory)",
    )
    p.add_argument(
        "--ssh",
        metavar="USER@HOST",
        default=None,
        help="open the SSH port-forward(s) for tcp:// sources with the system ssh (closed on exit)",
    )
    p.add_argument(
        "--ssh-timeout",
        metavar="S",
        type=_seconds_option(),
        default=20.0,
        help="seconds to wait for each SSH port-forward (default %(default)s)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="config file (default $XDG_CONFIG_HOME/rlhf-tui/config.toml): thresholds and [keys]",
    )
    _add_key_options(p)
    _add_alert_options(p)
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def _report_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rlhf-tui report", description="Headless report of a source (same view as the snapshot key).")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument(
        "--follow",
        action="store_true",
        help="keep following a live address or growing log until its run ends (or --timeout, Ctrl-C, SIGTERM), "
        "printing each new alarm as a line; the report only with --format or -o",
    )
    p.add_argument("--format", choices=("text", "markdown", "json"), default=None, help="default text")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.add_argument(
        "--wait-steps",
        type=_int_option(1),
        metavar="N",
        default=None,
        help="live source: wait until N steps have arrived (default: until the history is in)",
    )
    p.add_argument(
        "--timeout",
        type=_seconds_option(),
        metavar="S",
        default=None,
        help="live source: give up waiting after S seconds (default 10; with --follow: no limit)",
    )
    p.add_argument(
        "--fail-on",
        choices=Severity.names(),
        metavar="LEVEL",
        default=None,
        help="exit 1 if an anomaly of LEVEL (low|medium|high|critical) or worse was found",
    )
    p.add_argument("--thresholds", metavar="FILE", help="detector thresholds (TOML)")
    p.add_argument(
        "--width",
        type=_int_option(*REPORT_WIDTHS),
        metavar="N",
        default=110,
        help=f"text width of the text/markdown report, {REPORT_WIDTHS[0]} to {REPORT_WIDTHS[1]} (default %(default)s)",
    )
    _add_key_options(p)
    _add_alert_options(p)
    return p


def _demo_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rlhf-tui demo", description="Run a real tiny TRL GRPO training and monitor it live.")
    p.add_argument(
        "--steps",
        type=_int_option(1, MAX_DEMO_STEPS),
        default=300,
        help=f"training steps, 1 to {MAX_DEMO_STEPS} (default %(default)s)",
    )
    p.add_argument("--headless", action="store_true", help="no TUI: print the text report when training ends")
    p.add_argument(
        "--step-delay",
        type=_seconds_option(allow_zero=True),
        default=None,
        help="seconds to sleep per step so the run is watchable (default 0.1 live, 0 headless)",
    )
    p.add_argument(
        "--save-steps",
        type=_int_option(1),
        default=50,
        help="save (and analyse) a checkpoint every N steps (default %(default)s)",
    )
    p.add_argument("--format", choices=("text", "markdown", "json"), default="text", help="headless report format")
    return p


def _ckpt_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rlhf-tui analyze-checkpoint", description="Health, weight statistics and drift of a checkpoint.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--reference", metavar="PATH", help="reference checkpoint for drift")
    p.add_argument("--step", type=_int_option(0), default=None, help="the training step to label the result with")
    p.add_argument("--format", choices=("text", "json"), default="text")
    return p


def _load_thresholds(path: str | None, default=True):
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


def _check_live_address(source: str) -> None:
    if source.startswith("tcp://"):
        rest = source[len("tcp://") :]
        host, _, port = rest.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise CliError(f"bad address {source!r}: expected tcp://HOST:PORT")
    elif source.startswith("ipc://") and len(source) <= len("ipc://"):
        raise CliError(f"bad address {source!r}: expected ipc://PATH")


def load_store(source: str, *, wait_steps: int | None = None, timeout: float = 10.0, curve=None):
    """A Store filled from SOURCE; live sources are read for up to `timeout` seconds."""
    from rlhf_tui.bridge.monitor.sources import SourceError, is_live, load_file_source

    if is_live(source):
        _check_live_address(source)
        return _collect_live(source, wait_steps, timeout, curve)
    try:
        return load_file_source(source)
    except SourceError as exc:
        raise CliError(str(exc)) from None


def _collect_live(source: str, wait_steps: int | None, timeout: float, curve=None):
    from rlhf_tui.bridge.monitor.subscriber import Subscriber

    sub = Subscriber(source, curve=curve).start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            store = sub.store
            with store.lock:
                run = store.current_run
                rows = run.rows if run else 0
                caught_up = (
                    run is not None
                    and run.server_status
                    and run.last_seq >= int(run.server_status.get("last_seq", 1 << 62))
                )
            if wait_steps is not None and rows >= wait_steps:
                break
            if wait_steps is None and caught_up:
                break
            time.sleep(0.02)
    finally:
        sub.stop()
    store = sub.store
    if store.current_run is None:
        why = (
            f": {sub.error}" if sub.error else (" (is the training running with RLHFMonitorCallback on that address?)")
        )
        raise CliError(f"no data from {source} within {timeout:g} s{why}")
    return store


def format_report(store, thresholds, fmt: str, width: int = 110) -> tuple[str, dict]:
    """The report of a store as text, markdown (the snapshot key's view) or JSON (the contract's dict)."""
    if fmt == "json":
        from rlhf_tui.bridge.wire.protocol import to_json_safe
        from rlhf_tui.tui.widgets.model import complete_units

        with store.lock:  # units: what the training side recorded, completed from the trainer and the keys
            report = complete_units(build_report(store, thresholds), store.current_run)
        return json.dumps(to_json_safe(report), indent=2, allow_nan=False) + "\n", report
    from rlhf_tui.tui.render import render_markdown, render_text, spark_width_for
    from rlhf_tui.tui.widgets.model import view_report

    with store.lock:  # the same view as the monitor's snapshot key (sparklines at the text width, bands)
        report = view_report(store, thresholds, spark_width=spark_width_for(width))
    return (render_markdown(report) if fmt == "markdown" else render_text(report, width=width)), report


def cmd_report(argv: list[str]) -> int:
    ns = _report_parser().parse_args(argv)
    alerts = alert_options(ns, follow=ns.follow)
    thresholds = _load_thresholds(ns.thresholds)
    if ns.follow:
        from rlhf_tui.tui.follow import follow_source

        store, worst = follow_source(ns.source, thresholds, alerts, curve=_curve(ns), timeout=ns.timeout)
        if ns.format or ns.output:
            _write(format_report(store, thresholds, ns.format or "text", ns.width)[0], ns.output)
        return _exit_code(worst, ns.fail_on)
    timeout = 10.0 if ns.timeout is None else ns.timeout
    store = load_store(ns.source, wait_steps=ns.wait_steps, timeout=timeout, curve=_curve(ns))
    out, report = format_report(store, thresholds, ns.format or "text", ns.width)
    _write(out, ns.output)
    return _exit_code(worst_severity(report["anomalies"]), ns.fail_on)


def _exit_code(worst: str | None, fail_on: str | None) -> int:
    """EXIT_ANOMALY when an anomaly of `fail_on` or worse was found (--fail-on)."""
    return EXIT_ANOMALY if fail_on and worst is not None and Severity.at_least(worst, fail_on) else EXIT_OK


def _write(text: str, path: str | None) -> None:
    if path:
        try:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as exc:
            raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def cmd_analyze_checkpoint(argv: list[str]) -> int:
    ns = _ckpt_parser().parse_args(argv)
    from rlhf_tui.analysis.checkpoint import CheckpointAnalyzer, CheckpointError, format_checkpoint_text
    from rlhf_tui.analysis.safe_text import safe_name, safe_text

    try:
        result = CheckpointAnalyzer().analyze_checkpoint(
            ns.path, ns.step, reference_checkpoint=ns.reference, strict=True
        )
    except CheckpointError as exc:  # tensor names and header text come from the file: shown display-safe
        raise CliError(safe_name(str(exc).splitlines()[0]) if str(exc) else "unreadable checkpoint") from None
    if ns.format == "json":
        from rlhf_tui.bridge.wire.protocol import to_json_safe

        _write(json.dumps(to_json_safe(result), indent=2, allow_nan=False) + "\n", None)
    else:
        text = safe_text(format_checkpoint_text(result))  # tensor names, paths: no terminal control passes
        _write(text if text.endswith("\n") else text + "\n", None)
    return EXIT_OK


def cmd_demo(argv: list[str]) -> int:
    ns = _demo_parser().parse_args(argv)
    from rlhf_tui.tui.demo import DemoError, run_demo

    try:
        return run_demo(
            steps=ns.steps, headless=ns.headless, step_delay=ns.step_delay, save_steps=ns.save_steps, fmt=ns.format
        )
    except DemoError as exc:
        raise CliError(str(exc)) from None


def cmd_monitor(argv: list[str]) -> int:
    parser = _monitor_parser()
    ns = parser.parse_args(argv)
    if ns.version:
        from importlib.metadata import version

        print(f"rlhf-tui {version('rlhf-tui')}")
        return EXIT_OK
    thresholds = _load_thresholds(ns.thresholds, default=False)
    curve = _curve(ns)
    alerts = alert_options(ns)
    from rlhf_tui.tui.config import ConfigError, load_config

    try:
        config = load_config(ns.config)
    except ConfigError as exc:
        raise CliError(f"{exc} (fix it or delete it)") from None
    check_muted(config.thresholds.muted, f"config file {config.path}: [thresholds] muted")
    from rlhf_tui.bridge.monitor.sources import SourceError, is_live, resolve_file_source

    if not ns.sources:
        ns.sources = [default_source()]
    for source in ns.sources:
        if is_live(source):
            _check_live_address(source)
        else:
            try:
                resolve_file_source(source)
            except SourceError as exc:
                raise CliError(str(exc)) from None
    if ns.ssh and not any(s.startswith("tcp://") for s in ns.sources):
        raise CliError("--ssh needs at least one tcp://HOST:PORT source")
    if not sys.stdout.isatty() or not sys.stdin.isatty():
        raise CliError("the live monitor needs a terminal; use `rlhf-tui report SOURCE` for a headless report")
    sources, labels, tunnels = list(ns.sources), None, []
    if ns.ssh:
        sources, labels, tunnels = _open_ssh(ns.ssh, ns.sources, ns.ssh_timeout)
    try:
        from rlhf_tui.tui.app import MonitorApp

        app = MonitorApp(
            sources,
            thresholds=thresholds,
            snapshot_dir=ns.snapshot_dir,
            labels=labels,
            config=config,
            curve=curve,
            alerts=alerts,
        )
        app.run()
        app.cancel_hangup_timer()
        return app.return_code or EXIT_OK
    finally:
        for tunnel in tunnels:
            tunnel.close()


def default_source() -> str:
    """The live monitor's source when none is given: $RLHF_TUI_ADDRESS (the training side reads it too), else
    tcp://127.0.0.1:5555."""
    from rlhf_tui.analysis.safe_text import safe_name
    from rlhf_tui.bridge.monitor.sources import is_live

    value = os.environ.get(ADDRESS_ENV, "").strip()
    if not value:
        return DEFAULT_SOURCE
    if not is_live(value):
        raise CliError(
            f"{ADDRESS_ENV}={safe_name(value, 60)!r} is not an address: expected tcp://HOST:PORT or ipc://PATH"
        )
    try:
        _check_live_address(value)
    except CliError as exc:
        raise CliError(f"{ADDRESS_ENV}: {exc}") from None
    return value


def _open_ssh(destination: str, sources: list[str], timeout: float):
    """Forward each tcp source through `ssh -N -L`; returns (local sources, tab labels, tunnels)."""
    from rlhf_tui.tui.app import source_label
    from rlhf_tui.tui.ssh import TunnelError, open_tunnels

    tcp = [s for s in sources if s.startswith("tcp://")]
    print(f"rlhf-tui: opening SSH port-forward{'s' if len(tcp) > 1 else ''} via {destination} …", file=sys.stderr)
    try:
        tunnels = open_tunnels(destination, tcp, timeout=timeout)
    except TunnelError as exc:
        raise CliError(str(exc)) from None
    by_address = {t.address: t for t in tunnels}
    local, labels = [], []
    for source in sources:
        tunnel = by_address.get(source)
        local.append(tunnel.local_address if tunnel else source)
        labels.append(f"{source_label(source)} via {destination}" if tunnel else source_label(source))
    return local, labels, tunnels


def cmd_keygen(argv: list[str]) -> int:
    ns = _keygen_parser().parse_args(argv)
    from rlhf_tui.bridge.wire.security import SecurityError, cli_keygen

    try:
        return cli_keygen(ns.dir)
    except (SecurityError, OSError) as exc:
        raise CliError(str(exc).splitlines()[0] if str(exc) else "cannot create keys") from None


def cmd_backtest(argv: list[str]) -> int:
    from rlhf_tui.tui.backtest import cmd_backtest as run

    return run(argv)


COMMANDS = {
    "monitor": cmd_monitor,
    "report": cmd_report,
    "demo": cmd_demo,
    "backtest": cmd_backtest,
    "analyze-checkpoint": cmd_analyze_checkpoint,
    "keygen": cmd_keygen,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        return cmd_monitor(argv)
    except CliError as exc:
        print(f"rlhf-tui: error: {exc}" if not str(exc).startswith("rlhf-tui") else f"{exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # a bug of ours: still one line (RLHF_TUI_DEBUG=1 shows the traceback)
        if os.environ.get("RLHF_TUI_DEBUG"):
            raise
        print(
            f"rlhf-tui: internal error: {type(exc).__name__}: {exc} (set RLHF_TUI_DEBUG=1 for details)", file=sys.stderr
        )
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
