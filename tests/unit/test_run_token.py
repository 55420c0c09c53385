"""The run token (bridge/training/run_token.py): where each rank finds it, and that the file sharing it on a node
is private from its creation and never taken from a folder another user could have prepared."""

from __future__ import annotations

import os
import stat

import pytest

from rlhf_tui.bridge.training import run_token
from rlhf_tui.bridge.training.run_token import TokenError, TokenSource
from rlhf_tui.bridge.wire.security import ClientCurve, ServerCurve

ADDRESS = "tcp://127.0.0.1:5555"


@pytest.fixture
def home(tmp_path, monkeypatch):
    root = tmp_path / "runtime"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(root))
    monkeypatch.delenv(run_token.TOKEN_ENV, raising=False)
    return root


def test_the_token_file_is_private_and_a_rank_reads_it(home):
    old = os.umask(0)  # a permissive umask: the modes given at creation make it private, no chmod after
    try:
        path = run_token.write_token(ADDRESS, "abc123")
    finally:
        os.umask(old)
    assert path.parent == home / "rlhf-tui" and path == run_token.token_path(ADDRESS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert run_token.read_token(path) == "abc123"
    assert run_token.token_path("tcp://127.0.0.1:5556") != path  # one file per run address
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_a_rank_waits_for_the_file_and_follows_a_new_run_s_token(home):
    source = TokenSource(ADDRESS)
    assert source.get() is None  # the main process has not written it yet: the rank retries later
    run_token.write_token(ADDRESS, "first")
    assert source.get() == "first"
    run_token.write_token(ADDRESS, "second-run")  # a stale file replaced by the next run on this address
    assert source.get() == "second-run"
    run_token.remove_token(run_token.token_path(ADDRESS), "not-ours")  # another run's: kept
    assert run_token.token_path(ADDRESS).exists()
    run_token.remove_token(run_token.token_path(ADDRESS), "second-run")
    assert not run_token.token_path(ADDRESS).exists()


@pytest.mark.parametrize("mode", [0o777, 0o750])
def test_a_folder_others_can_read_or_write_is_refused(home, mode):
    folder = home / "rlhf-tui"
    folder.mkdir()
    folder.chmod(mode)
    with pytest.raises(TokenError, match="not a private folder"):
        run_token.write_token(ADDRESS, "secret")
    assert list(folder.iterdir()) == []
    source = TokenSource(ADDRESS)
    assert source.get() is None and source.error is None  # nothing there to read: no token, no error
    (folder / run_token.token_path(ADDRESS).name).write_text("planted\n")
    assert source.get() is None and "not a private folder" in source.error


def test_a_symlinked_folder_and_a_readable_file_are_refused(home, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (home / "rlhf-tui").symlink_to(elsewhere)
    with pytest.raises(TokenError):
        run_token.write_token(ADDRESS, "secret")
    (home / "rlhf-tui").unlink()
    path = run_token.write_token(ADDRESS, "secret")
    path.chmod(0o644)
    with pytest.raises(TokenError, match="not a private file"):
        run_token.read_token(path)


def test_the_environment_and_curve_give_every_rank_the_same_token(home, monkeypatch):
    server = ServerCurve(b"P" * 40, b"S" * 40, None)
    assert run_token.curve_token(server) == run_token.curve_token(server.rank_client())
    assert run_token.curve_token(ClientCurve(b"P" * 40, b"M" * 40, b"m" * 40)) is None  # a monitor's key
    assert run_token.main_token(server) == TokenSource(ADDRESS, server.rank_client()).get()
    assert run_token.shared_without_file(server) and not run_token.shared_without_file(None)
    monkeypatch.setenv(run_token.TOKEN_ENV, "from-the-launcher")
    assert run_token.main_token(server) == "from-the-launcher" == TokenSource(ADDRESS, server).get()
    monkeypatch.setenv(run_token.TOKEN_ENV, "two words")
    with pytest.raises(TokenError, match="printable ASCII"):
        run_token.main_token(None)
    assert TokenSource(ADDRESS).get() is None


def test_matches_takes_only_the_exact_token():
    assert run_token.matches("t0k3n", "t0k3n")
    for given in (None, "", "t0k3", "t0k3n ", "T0K3N", 12345, ["t0k3n"], "t0k3né", "x" * 300):
        assert not run_token.matches("t0k3n", given)
    assert not run_token.matches(None, "t0k3n")
