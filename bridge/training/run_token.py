"""The run token: what proves that a `forward` envelope comes from a rank of this job.

Any local process can connect to the run's port, so the main process accepts forwarded samples only with the
run's secret token (see docs/security.md, "Forwarded samples"). Every rank finds the same token, first match:

1. `RLHF_TUI_RUN_TOKEN` in the environment (the launcher passes it to every rank: the way for multi-node);
2. with CURVE, one derived from the run's server secret key, which every rank loads to connect anyway;
3. else the main process makes a random one and writes it to a private file (0600, in a 0700 folder of this
   user, named from a hash of the address the ranks connect to); ranks on the same node read it.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Any

TOKEN_ENV = "RLHF_TUI_RUN_TOKEN"
MAX_TOKEN_CHARS = 256
MAX_FILE_BYTES = 1024

_written: dict[Path, str] = {}  # token files this process wrote and has not removed: removed at exit too


class TokenError(Exception):
    """The token cannot be shared or read safely; one clear line."""


def valid_token(token: Any) -> bool:
    """A token is 1..256 printable ASCII characters, no spaces (what compare_digest can take)."""
    return (
        type(token) is str
        and 0 < len(token) <= MAX_TOKEN_CHARS
        and token.isascii()
        and token.isprintable()
        and " " not in token
    )


def matches(expected: str | None, given: Any) -> bool:
    """`given` (from the wire: anything) is the run's token; constant time in the token's content."""
    if expected is None or not valid_token(given):
        return False
    return hmac.compare_digest(given.encode("ascii"), expected.encode("ascii"))


def env_token() -> str | None:
    """RLHF_TUI_RUN_TOKEN, or None when unset or empty. TokenError for one that is not a usable token."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        return None
    if not valid_token(token):
        raise TokenError(f"{TOKEN_ENV} must be 1-{MAX_TOKEN_CHARS} printable ASCII characters without spaces")
    return token


def curve_token(curve: Any) -> str | None:
    """A token derived from a CURVE server secret key (every rank of a CURVE run loads it), or None. A client
    config counts only when it is the run's own rank client (the server's pair), not a monitor's key."""
    if hasattr(curve, "server_public") and getattr(curve, "public", None) != curve.server_public:
        return None
    secret = getattr(curve, "secret", None)
    if not isinstance(secret, bytes) or not secret:
        return None
    return hmac.new(secret, b"rlhf-tui forward token v1", hashlib.sha256).hexdigest()


def token_dir() -> Path:
    """This user's folder for run tokens: $XDG_RUNTIME_DIR/rlhf-tui, else <tmp>/rlhf-tui-<uid>."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "rlhf-tui"
    return Path(tempfile.gettempdir()) / f"rlhf-tui-{os.getuid()}"


def token_path(address: str) -> Path:
    """The token file of the run whose ranks connect to `address` (the forward address)."""
    digest = hashlib.sha256(address.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return token_dir() / f"forward-{digest}.token"


def _check_private(st: os.stat_result, path: Path, want_dir: bool) -> None:
    kind_ok = stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)
    if not kind_ok or st.st_uid != os.getuid() or st.st_mode & 0o077:
        what = "folder (mode 0700)" if want_dir else "file (mode 0600)"
        raise TokenError(f"{path} is not a private {what} of this user: refusing to use it for the run token")


def _private_dir(path: Path, create: bool) -> None:
    if create:
        try:
            os.mkdir(path, 0o700)  # private from its first moment (no chmod window)
        except FileExistsError:
            pass
    _check_private(os.lstat(path), path, want_dir=True)  # lstat: a symlink planted by another user is refused


def write_token(address: str, token: str) -> Path:
    """The main process: write `token` for the ranks connecting to `address`. The file is created 0600 under a
    temporary name and renamed, so a reader never sees it half written nor readable by others."""
    path = token_path(address)
    _private_dir(path.parent, create=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(token + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _written[path] = token
    return path


def read_token(path: Path) -> str | None:
    """A rank: the token in `path`, or None when there is none yet. TokenError when it is not private."""
    try:
        _private_dir(path.parent, create=False)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        _check_private(st, path, want_dir=False)
        raw = os.read(fd, MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    token = raw.decode("ascii", "replace").strip()
    if len(raw) > MAX_FILE_BYTES or not valid_token(token):
        raise TokenError(f"{path} holds no valid run token")
    return token


def remove_token(path: Path, token: str) -> None:
    """At the run's end: remove the file if it still holds this run's token (a later run may have replaced it)."""
    if _written.get(path) == token:
        del _written[path]
    try:
        if read_token(path) == token:
            path.unlink()
    except (OSError, TokenError):
        pass


@atexit.register
def _remove_written() -> None:
    """At interpreter exit: the token files of runs that were never closed (a custom loop, a crash)."""
    for path, token in list(_written.items()):
        remove_token(path, token)


def main_token(curve: Any) -> str:
    """The main process's token: from the environment, from CURVE, else a new random one (to be written)."""
    return env_token() or curve_token(curve) or secrets.token_hex(16)


def shared_without_file(curve: Any) -> bool:
    """True when every rank finds the token without a file (environment or CURVE)."""
    return bool(os.environ.get(TOKEN_ENV, "").strip()) or curve_token(curve) is not None


class TokenSource:
    """A non-main rank's token: fixed (environment, CURVE) or read from the main process's file, which may not
    exist yet when the rank starts, or still be a previous run's: `get()` reads it again whenever the file
    changes (one stat per call; called at most once per sample, on the forwarder's thread)."""

    def __init__(self, address: str, curve: Any = None):
        self.error: str | None = None
        self.path: Path | None = None
        try:
            self._fixed = env_token() or curve_token(curve)
        except TokenError as exc:
            self._fixed, self.error = None, str(exc)
            return
        if self._fixed is None:
            self.path = token_path(address)
        self._token: str | None = None
        self._key: tuple | None = None

    def get(self) -> str | None:
        if self._fixed is not None or self.path is None:
            return self._fixed
        try:
            st = os.stat(self.path)
        except OSError:
            return self._token  # not written yet, or removed at the run's end: keep what we had
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._key:
            self._key = key
            try:
                self._token, self.error = read_token(self.path), None
            except (OSError, TokenError) as exc:
                self._token, self.error = None, str(exc)
        return self._token
