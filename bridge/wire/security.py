"""CURVE authentication for remote attach: key files, the training side's server config, a monitor's client
config. See docs/security.md for the threat model.

Keys are ZeroMQ certificate files (`zmq.auth.create_certificates`): `NAME.key` holds a public key and may be
copied anywhere; `NAME.key_secret` holds the key pair and must stay private. `rlhf-tui keygen DIR` lays out:

    DIR/server.key, DIR/server.key_secret     the training run's pair (give server.key to monitors)
    DIR/client.key, DIR/client.key_secret     one monitor's pair
    DIR/authorized/client.key                 public keys of the monitors the training accepts

Without CURVE support in libzmq nothing falls back to plain text: both sides refuse (fail closed).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

log = logging.getLogger("rlhf_tui.bridge")

SERVER, CLIENT, AUTHORIZED = "server", "client", "authorized"
RESCAN_S = 1.0  # an unknown key makes the authorised directory be read again, at most this often
ZAP_DOMAIN = "rlhf-tui"


class SecurityError(Exception):
    """A key problem a user can fix (missing/unreadable key file, no CURVE in libzmq); one clear line."""


def curve_available() -> bool:
    try:
        import zmq

        return bool(zmq.has("curve"))
    except Exception:
        return False


def _require_curve() -> None:
    if not curve_available():
        raise SecurityError(
            "this libzmq has no CURVE support: refusing to run without encryption "
            "(install a pyzmq wheel built with libsodium/CURVE)"
        )


def keygen(directory: str | os.PathLike, *, client_name: str = CLIENT, overwrite: bool = False) -> dict[str, str]:
    """Create a server pair, a client pair and the `authorized/` folder holding the client's public key.
    Existing keys are kept unless `overwrite`. Returns the paths written (or found)."""
    _require_curve()
    import zmq.auth

    root = Path(directory).expanduser()
    if not root.exists():
        # A folder we create holds secrets: private from its first moment (an existing one is left as it is).
        root.mkdir(parents=True, mode=0o700)
    authorized = root / AUTHORIZED
    authorized.mkdir(exist_ok=True)
    out = {}
    for name in (SERVER, client_name):
        public, secret = root / f"{name}.key", root / f"{name}.key_secret"
        if overwrite or not (public.is_file() and secret.is_file()):
            public_key, secret_key = zmq.curve_keypair()
            _write_certificate(public, public_key, None)
            _write_certificate(secret, public_key, secret_key)
        out[name] = str(public)
        out[f"{name}_secret"] = str(secret)
    shutil.copyfile(root / f"{client_name}.key", authorized / f"{client_name}.key")
    out[AUTHORIZED] = str(authorized)
    return out


def _write_certificate(path: Path, public_key: bytes, secret_key: bytes | None) -> None:
    """A ZeroMQ certificate file (the format of `zmq.auth.create_certificates`, read by `load_certificate`),
    created with its final mode: 0600 for a secret key, so it is never readable by others, not even between
    its creation and a chmod (pyzmq creates with the umask's mode)."""
    mode = 0o600 if secret_key is not None else 0o644
    text = f"#   rlhf-tui {'secret' if secret_key else 'public'} key\nmetadata\ncurve\n"
    text += f'    public-key = "{public_key.decode()}"\n'
    if secret_key is not None:
        text += f'    secret-key = "{secret_key.decode()}"\n'
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(text)
        os.replace(tmp, path)  # an existing file (overwrite=True) is swapped whole, mode included
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_public(path: str | os.PathLike) -> bytes:
    """The public key of a `.key` (or `.key_secret`) certificate file."""
    import zmq.auth

    try:
        public, _ = zmq.auth.load_certificate(Path(path).expanduser())
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read key file {path}: {exc}") from None
    if not public:
        raise SecurityError(f"no public key in {path}")
    return public


def load_pair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) of a `.key_secret` certificate file."""
    import zmq.auth

    path = Path(path).expanduser()
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read key file {path}: {exc}") from None
    if not secret:
        raise SecurityError(f"{path} holds no secret key (pass the .key_secret file)")
    return public, secret


def _public_keys(directory: Path) -> set[bytes]:
    import zmq.auth

    if not directory.is_dir():
        return set()
    try:
        return set(zmq.auth.load_certificates(directory))
    except Exception as exc:  # one bad file must not lock everyone out silently
        log.warning("rlhf-tui: cannot read authorised keys in %s: %s", directory, exc)
        return set()


class _AuthorizedKeys:
    """ZAP credentials provider: keys in a directory (re-read when an unknown key knocks, so a new monitor
    can be authorised during a run) plus fixed keys (the run's own ranks)."""

    def __init__(self, directory: Path | None, fixed: set[bytes]):
        self.directory = directory
        self.fixed = set(fixed)
        self.keys = _public_keys(directory) if directory else set()
        self.scanned = time.monotonic()
        self.denied = 0
        self._lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        with self._lock:
            if key in self.fixed or key in self.keys:
                return True
            if self.directory is not None and time.monotonic() - self.scanned >= RESCAN_S:
                self.keys = _public_keys(self.directory)
                self.scanned = time.monotonic()
                if key in self.keys:
                    return True
            self.denied += 1
            return False


class ServerCurve:
    """The training side's CURVE config: its key pair and which monitors may attach.

    `ServerCurve.from_keys_dir(DIR)` uses DIR/server.key_secret (created with `keygen` when missing) and the
    public keys in DIR/authorized/. `ServerCurve.ephemeral(authorized_dir, public_key_path)` makes a fresh
    pair for this run only and writes its public key file for monitors to use.
    """

    def __init__(
        self, public: bytes, secret: bytes, authorized_dir: str | os.PathLike | None, *, allow_own_key: bool = True
    ):
        self.public, self.secret = public, secret
        self.authorized_dir = Path(authorized_dir).expanduser() if authorized_dir else None
        self.allow_own_key = allow_own_key  # other ranks of the run attach with the server's own pair
        self.provider: _AuthorizedKeys | None = None

    @classmethod
    def from_keys_dir(cls, directory: str | os.PathLike, *, create: bool = True) -> ServerCurve:
        _require_curve()
        root = Path(directory).expanduser()
        secret_file = root / f"{SERVER}.key_secret"
        if not secret_file.is_file():
            if not create:
                raise SecurityError(f"no server key in {root} (run `rlhf-tui keygen {root}`)")
            keygen(root)
        public, secret = load_pair(secret_file)
        return cls(public, secret, root / AUTHORIZED)

    @classmethod
    def ephemeral(
        cls, authorized_dir: str | os.PathLike, public_key_path: str | os.PathLike | None = None
    ) -> ServerCurve:
        _require_curve()
        import zmq

        public, secret = zmq.curve_keypair()
        if public_key_path is not None:
            path = Path(public_key_path).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f'#   rlhf-tui run server key (public)\ncurve\n    public-key = "{public.decode()}"\n')
        return cls(public, secret, authorized_dir)

    def apply_server(self, sock) -> None:
        """Make a (ROUTER) socket a CURVE server; before bind."""
        _require_curve()
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()

    def authenticator(self, ctx):
        """Start the ZAP handler on `ctx` (the publisher thread's context). Without it libzmq would accept
        any client key. Returns the authenticator; call `.stop()` before terminating the context."""
        from zmq.auth.thread import ThreadAuthenticator

        fixed = {self.public} if self.allow_own_key else set()
        self.provider = _AuthorizedKeys(self.authorized_dir, fixed)
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("rlhf_tui.zap"))
        auth.start()
        auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self.provider)
        return auth

    def rank_client(self) -> ClientCurve:
        """What the run's other ranks use to forward their samples to this server."""
        return ClientCurve(self.public, self.public, self.secret)


class ClientCurve:
    """A monitor's (or another rank's) CURVE config: the server's public key and the client's own pair."""

    def __init__(self, server_public: bytes, public: bytes, secret: bytes):
        self.server_public, self.public, self.secret = server_public, public, secret

    @classmethod
    def from_files(cls, server_key: str | os.PathLike, client_key: str | os.PathLike) -> ClientCurve:
        """`--server-key FILE` (the run's public key) and `--client-key FILE` (this monitor's .key_secret)."""
        _require_curve()
        server_public = load_public(server_key)
        public, secret = load_pair(client_key)
        return cls(server_public, public, secret)

    @classmethod
    def from_keys_dir(cls, directory: str | os.PathLike, client_name: str = CLIENT) -> ClientCurve:
        """`--keys-dir DIR`: DIR/server.key and DIR/<client>.key_secret."""
        root = Path(directory).expanduser()
        return cls.from_files(root / f"{SERVER}.key", root / f"{client_name}.key_secret")

    def apply_client(self, sock) -> None:
        """Make a (DEALER) socket a CURVE client; before connect. Raises SecurityError without CURVE."""
        _require_curve()
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def client_from_options(
    server_key: str | None = None, client_key: str | None = None, keys_dir: str | None = None
) -> ClientCurve | None:
    """The monitor's CLI options to a ClientCurve (None: plain, loopback/SSH-forward use). SecurityError with
    one clear line for a bad combination or an unreadable key."""
    if keys_dir and (server_key or client_key):
        raise SecurityError("use either --keys-dir or --server-key/--client-key, not both")
    if keys_dir:
        return ClientCurve.from_keys_dir(keys_dir)
    if server_key or client_key:
        if not (server_key and client_key):
            raise SecurityError("--server-key and --client-key go together")
        return ClientCurve.from_files(server_key, client_key)
    return None


def server_from_options(curve=None, keys_dir: str | None = None):
    """The callback's `curve=` / `keys_dir=` to a ServerCurve (or None)."""
    if curve is not None:
        return curve
    if keys_dir:
        return ServerCurve.from_keys_dir(keys_dir)
    return None


def format_keygen(paths: dict[str, str]) -> str:
    """What `rlhf-tui keygen DIR` prints."""
    return (
        f"server key pair:  {paths[SERVER + '_secret']}  (training side; keep private)\n"
        f"server public key: {paths[SERVER]}  (copy to each monitor: --server-key)\n"
        f"client key pair:  {paths[CLIENT + '_secret']}  (monitor side: --client-key)\n"
        f"authorised keys:  {paths[AUTHORIZED]}/  (put each monitor's public .key here)\n"
    )


def cli_keygen(directory: str) -> int:
    """`rlhf-tui keygen DIR`: returns the exit code; SecurityError/OSError carry one line for the CLI."""
    print(format_keygen(keygen(directory)), end="")
    return 0
