"""`--ssh user@host`: SSH port-forwards opened with the system `ssh`, one per tcp source, closed on exit.

`ssh -N -L LOCAL:HOST:PORT user@host -o ExitOnForwardFailure=yes -o ServerAliveInterval=15`; we wait until the
local port accepts connections. If the forward dies later (network drop), it is restarted in the background with
backoff (non-interactively: BatchMode), while the subscriber shows the connection as stale/unreachable.
"""

from __future__ import annotations

import atexit
import shutil
import socket
import subprocess
import threading
import time
from urllib.parse import urlsplit

SSH_OPTIONS = ("-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=15")
_OPEN: list[Tunnel] = []
_OPEN_LOCK = threading.Lock()


class TunnelError(Exception):
    """The forward could not be opened; one line for the user."""


def split_tcp(address: str) -> tuple[str, int]:
    parts = urlsplit(address)
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise TunnelError(f"--ssh needs tcp://HOST:PORT sources, not {address!r}")
    return parts.hostname, parts.port


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Tunnel:
    """One `ssh -N -L` process forwarding 127.0.0.1:local_port to HOST:PORT as seen from `destination`."""

    def __init__(
        self,
        destination: str,
        address: str,
        *,
        local_port: int | None = None,
        ssh: str = "ssh",
        extra_args: tuple[str, ...] = (),
    ):
        self.destination = destination
        self.address = address
        self.remote_host, self.remote_port = split_tcp(address)
        if local_port is None:
            local_port = self.remote_port if _port_free(self.remote_port) else _free_port()
        self.local_port = local_port
        self.ssh = ssh
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None
        self._stderr_path: str | None = None

    @property
    def local_address(self) -> str:
        return f"tcp://127.0.0.1:{self.local_port}"

    def command(self, batch: bool = False) -> list[str]:
        cmd = [
            self.ssh,
            "-N",
            "-L",
            f"{self.local_port}:{self.remote_host}:{self.remote_port}",
            self.destination,
            *SSH_OPTIONS,
        ]
        if batch:
            cmd += ["-o", "BatchMode=yes"]
        return cmd + list(self.extra_args)

    def _spawn(self, batch: bool) -> subprocess.Popen:
        import tempfile

        err = tempfile.NamedTemporaryFile(prefix="rlhf-tui-ssh-", suffix=".log", delete=False)
        self._stderr_path = err.name
        # stdin closed: a password prompt, if any, goes through /dev/tty before the monitor starts.
        return subprocess.Popen(self.command(batch), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)

    def _stderr_tail(self) -> str:
        try:
            with open(self._stderr_path or "", errors="replace") as fh:
                lines = [line.strip() for line in fh if line.strip()]
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def open(self, timeout: float = 20.0) -> Tunnel:
        """Start ssh and wait until the local port accepts connections (TunnelError otherwise)."""
        if shutil.which(self.ssh) is None:
            raise TunnelError(f"--ssh: no `{self.ssh}` executable on PATH")
        self.proc = self._spawn(batch=False)
        with _OPEN_LOCK:
            _OPEN.append(self)
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                why = self._stderr_tail() or f"ssh exited with code {code}"
                self.close()
                raise TunnelError(f"ssh port-forward to {self.destination} failed: {why}")
            if _accepts(self.local_port):
                break
            if time.monotonic() > deadline:
                self.close()
                raise TunnelError(
                    f"ssh port-forward to {self.destination} not up after {timeout:g} s (local port {self.local_port})"
                )
            time.sleep(0.05)
        self._watcher = threading.Thread(target=self._watch, name="rlhf-tui-ssh", daemon=True)
        self._watcher.start()
        return self

    def _watch(self) -> None:
        """Restart the forward with backoff if ssh exits while the monitor runs."""
        delay = 1.0
        while not self._closed.wait(0.5):
            proc = self.proc
            if proc is None or proc.poll() is None:
                continue
            if self._closed.wait(delay):
                return
            delay = min(delay * 2, 30.0)
            try:
                self.proc = self._spawn(batch=True)
                self.restarts += 1
            except OSError:
                continue
            started = time.monotonic()
            while not self._closed.is_set() and self.proc.poll() is None and time.monotonic() - started < 10:
                if _accepts(self.local_port):
                    delay = 1.0
                    break
                time.sleep(0.1)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self, timeout: float = 3.0) -> None:
        """Stop ssh (TERM, then KILL); safe to call twice."""
        self._closed.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        with _OPEN_LOCK:
            if self in _OPEN:
                _OPEN.remove(self)
        if self._stderr_path:
            try:
                import os

                os.unlink(self._stderr_path)
            except OSError:
                pass
            self._stderr_path = None


def open_tunnels(destination: str, addresses: list[str], *, timeout: float = 20.0, ssh: str = "ssh") -> list[Tunnel]:
    """One tunnel per tcp address (other sources are left alone: None in their place is not returned)."""
    tunnels: list[Tunnel] = []
    try:
        used: set[int] = set()
        for address in addresses:
            tunnel = Tunnel(destination, address, ssh=ssh)
            if tunnel.local_port in used:
                tunnel.local_port = _free_port()
            used.add(tunnel.local_port)
            tunnels.append(tunnel.open(timeout))
    except BaseException:
        for tunnel in tunnels:
            tunnel.close()
        raise
    return tunnels


def close_all() -> None:
    with _OPEN_LOCK:
        tunnels = list(_OPEN)
    for tunnel in tunnels:
        tunnel.close(1.0)


atexit.register(close_all)
