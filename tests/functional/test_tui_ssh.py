"""`--ssh user@host`: the port-forward is opened with the system `ssh` (here a stand-in `ssh` on PATH that
forwards like `ssh -L` and records its arguments), waited for, used end to end, and closed."""

import os
from pathlib import Path

import pytest
from conftest import free_port, wait_for

from rlhf_tui.bridge.monitor.subscriber import Subscriber
from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
from rlhf_tui.tui import ssh
from rlhf_tui.tui.cli import CliError, _open_ssh


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch, install_fake_ssh):
    bindir = tmp_path / "bin"
    install_fake_ssh(bindir)
    log = tmp_path / "ssh.log"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SSH_LOG", str(log))
    return log


def _calls(log: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def test_tunnel_forwards_a_live_run_and_closes(fake_ssh):
    remote_port = free_port()
    address = f"tcp://127.0.0.1:{remote_port}"
    cb = RLHFMonitorCallback(address=address, log_dir=None, analyze_checkpoints=False)
    for step in range(1, 11):
        cb.log_step(step, {"kl": 0.01, "reward": 1.0})
    sources, labels, tunnels = _open_ssh("me@gpu-host", [address, "./not-forwarded.jsonl"], timeout=10)
    try:
        (tunnel,) = tunnels
        assert sources[1] == "./not-forwarded.jsonl" and "via me@gpu-host" in labels[0]
        args = _calls(fake_ssh)[0]["args"]
        assert args[:4] == ["-N", "-L", f"{tunnel.local_port}:127.0.0.1:{remote_port}", "me@gpu-host"]
        assert "ExitOnForwardFailure=yes" in args and "ServerAliveInterval=15" in args
        sub = Subscriber(sources[0]).start()
        try:
            wait_for(
                lambda: sub.store.current_run is not None and sub.store.current_run.rows == 10,
                message="steps through the tunnel",
            )
        finally:
            sub.stop()
    finally:
        cb.close()
        for t in tunnels:
            t.close()
    pid = _calls(fake_ssh)[0]["pid"]
    wait_for(lambda: not _alive(pid), timeout=5, message="ssh stopped")
    assert ssh._OPEN == []


def test_tunnel_failure_is_one_line(fake_ssh, monkeypatch):
    monkeypatch.setenv("FAKE_SSH_FAIL", "1")
    with pytest.raises(CliError) as info:
        _open_ssh("me@nowhere", [f"tcp://127.0.0.1:{free_port()}"], timeout=5)
    assert "Connection refused" in str(info.value) and "\n" not in str(info.value)


def test_ssh_needs_tcp_sources_and_an_ssh_executable(monkeypatch, tmp_path):
    with pytest.raises(ssh.TunnelError):
        ssh.split_tcp("ipc:///tmp/x")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ssh.TunnelError, match="no `ssh`"):
        ssh.Tunnel("me@host", "tcp://127.0.0.1:5555").open(timeout=1)
