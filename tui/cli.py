"""`rlhf-tui` command line: the live monitor, `demo`, `report`, `backtest` (tui/backtest.py), `analyze-checkpoint`.

The commands; their parsers and the checks of their options are tui/cli_options.py. Errors a user can cause
print one line on stderr and exit 2; never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time

from rlhf_tui.analysis.report import build_report, worst_severity
from rlhf_tui.analysis.severity import Severity
from rlhf_tui.tui.cli_options import (
    ADDRESS_ENV,
    DEFAULT_SOURCE,
    EXIT_ANOMALY,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    alert_options,
    check_live_address,
    check_muted,
    checkpoint_parser,
    curve_option,
    demo_parser,
    keygen_parser,
    monitor_parser,
    report_parser,
    thresholds_option,
)


def load_store(source: str, *, wait_steps: int | None = None, timeout: float = 10.0, curve=None):
    """A Store filled from SOURCE; live sources are read for up to `timeout` seconds."""
    from rlhf_tui.bridge.monitor.sources import SourceError, is_live, load_file_source

    if is_live(source):
        check_live_address(source)
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
    ns = report_parser().parse_args(argv)
    alerts = alert_options(ns, follow=ns.follow)
    thresholds = thresholds_option(ns.thresholds)
    if ns.follow:
        from rlhf_tui.tui.follow import follow_source

        store, worst = follow_source(ns.source, thresholds, alerts, curve=curve_option(ns), timeout=ns.timeout)
        if ns.format or ns.output:
            _write(format_report(store, thresholds, ns.format or "text", ns.width)[0], ns.output)
        return _exit_code(worst, ns.fail_on)
    timeout = 10.0 if ns.timeout is None else ns.timeout
    store = load_store(ns.source, wait_steps=ns.wait_steps, timeout=timeout, curve=curve_option(ns))
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
    ns = checkpoint_parser().parse_args(argv)
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
    ns = demo_parser().parse_args(argv)
    from rlhf_tui.tui.demo import DemoError, run_demo

    try:
        return run_demo(
            steps=ns.steps, headless=ns.headless, step_delay=ns.step_delay, save_steps=ns.save_steps, fmt=ns.format
        )
    except DemoError as exc:
        raise CliError(str(exc)) from None


def cmd_monitor(argv: list[str]) -> int:
    parser = monitor_parser()
    ns = parser.parse_args(argv)
    if ns.version:
        from importlib.metadata import version

        print(f"rlhf-tui {version('rlhf-tui')}")
        return EXIT_OK
    thresholds = thresholds_option(ns.thresholds, default=False)
    curve = curve_option(ns)
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
            check_live_address(source)
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
        check_live_address(value)
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
    ns = keygen_parser().parse_args(argv)
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
