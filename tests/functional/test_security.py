"""CURVE for remote attach: keygen, authorised monitors get data, others get nothing and training goes on;
non-loopback binds need CURVE or insecure=True; without CURVE in libzmq both sides fail closed."""

from __future__ import annotations

import os
import shutil
import time
import warnings

import pytest
import zmq
from conftest import free_address, wait_for

from rlhf_tui.bridge.monitor.subscriber import Subscriber
from rlhf_tui.bridge.training import publisher as publisher_module
from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
from rlhf_tui.bridge.wire import security
from rlhf_tui.bridge.wire.security import ClientCurve, SecurityError, ServerCurve, client_from_options, keygen

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


def _cb(address, tmp_path, **kw):
    return RLHFMonitorCallback(address=address, log_dir=str(tmp_path / "logs"), analyze_checkpoints=False, **kw)


def _steps(cb, first, last):
    for step in range(first, last + 1):
        cb.log_step(step, {"loss": 1.0 / step, "kl": 0.01})


def test_keygen_lays_out_keys_and_keeps_secrets_private(tmp_path):
    paths = keygen(tmp_path / "keys")
    root = tmp_path / "keys"
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret", "authorized/client.key"):
        assert (root / name).is_file(), name
    assert os.stat(root / "server.key_secret").st_mode & 0o077 == 0
    assert os.stat(root / "client.key_secret").st_mode & 0o077 == 0
    assert "secret" not in (root / "authorized" / "client.key").read_text()
    assert keygen(root) == paths  # idempotent: existing keys are kept
    assert security.load_public(root / "server.key") == security.load_pair(root / "server.key_secret")[0]
    text = security.format_keygen(paths)
    assert "--server-key" in text and "--client-key" in text


def test_secret_keys_and_their_folder_are_private_from_their_creation(tmp_path, monkeypatch):
    # They were created with the umask's mode (0644) and chmod'ed afterwards: in an existing folder another user
    # could open the secret between the two. With no chmod at all they must still come out private.
    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)
    old_umask = os.umask(0o022)
    try:
        keygen(tmp_path / "new" / "keys", overwrite=True)
        existing = tmp_path / "existing"
        existing.mkdir(mode=0o755)
        keygen(existing)
        keygen(existing, overwrite=True)  # replaced whole, still private
    finally:
        os.umask(old_umask)
    for root in (tmp_path / "new" / "keys", existing):
        for name in ("server.key_secret", "client.key_secret"):
            assert os.stat(root / name).st_mode & 0o777 == 0o600, (root, name)
        assert os.stat(root / "server.key").st_mode & 0o777 == 0o644
        assert not list(root.glob(".*.tmp"))
    assert os.stat(tmp_path / "new" / "keys").st_mode & 0o777 == 0o700
    assert security.load_public(existing / "server.key") == security.load_pair(existing / "server.key_secret")[0]


def test_authorised_monitor_receives_and_others_get_nothing(tmp_path):
    keys, stranger = tmp_path / "keys", tmp_path / "stranger"
    keygen(keys)
    keygen(stranger)
    address = free_address()
    cb = _cb(address, tmp_path, keys_dir=str(keys))
    _steps(cb, 1, 20)
    assert cb.publisher.bound
    good = Subscriber(address, curve=ClientCurve.from_keys_dir(keys)).start()
    plain = Subscriber(address).start()  # no key at all
    unknown = Subscriber(
        address,
        curve=ClientCurve(
            security.load_public(keys / "server.key"), *security.load_pair(stranger / "client.key_secret")
        ),
    ).start()
    wrong_server = Subscriber(address, curve=ClientCurve.from_keys_dir(stranger)).start()  # thinks it's elsewhere
    try:
        wait_for(
            lambda: good.store.current_run is not None and good.store.current_run.rows == 20,
            timeout=10,
            message="authorised monitor gets the history",
        )
        _steps(cb, 21, 40)  # training goes on undisturbed while the others knock
        wait_for(lambda: good.store.current_run.rows == 40, message="live steps over CURVE")
        time.sleep(1.0)  # give the refused ones time to (not) receive anything
        for sub in (plain, unknown, wrong_server):
            assert sub.store.current_run is None and sub.store.transport["received"] == 0
        assert "refused this monitor's key" in unknown.error and "handshake" in wrong_server.error
        assert cb._publisher._curve.provider.denied >= 1
        assert good.store.transport["gaps"] == 0 and good.store.transport["rejected"] == 0
    finally:
        for sub in (good, plain, unknown, wrong_server):
            sub.stop()
        cb.close()
    lines = open(cb.log_path).read().count('"step_end"')
    assert lines == 40


def test_a_key_added_to_the_authorised_folder_mid_run_is_accepted(tmp_path):
    keys, laptop = tmp_path / "keys", tmp_path / "laptop"
    keygen(keys)
    keygen(laptop)  # the laptop's own pair; only its public key travels
    shutil.copy(keys / "server.key", laptop / "server.key")
    address = free_address()
    cb = _cb(address, tmp_path, keys_dir=str(keys))
    _steps(cb, 1, 5)
    sub = Subscriber(address, curve=ClientCurve.from_keys_dir(laptop)).start()
    try:
        time.sleep(0.5)
        assert sub.store.current_run is None
        shutil.copy(laptop / "client.key", keys / "authorized" / "laptop.key")
        wait_for(
            lambda: sub.store.current_run is not None and sub.store.current_run.rows == 5,
            timeout=15,
            message="accepted after the key was authorised",
        )
    finally:
        sub.stop()
        cb.close()


def test_ephemeral_server_key_per_run(tmp_path):
    keys = tmp_path / "keys"
    keygen(keys)
    address = free_address()
    curve = ServerCurve.ephemeral(keys / "authorized", public_key_path=tmp_path / "run.server.key")
    cb = _cb(address, tmp_path, curve=curve)
    _steps(cb, 1, 3)
    sub = Subscriber(
        address, curve=ClientCurve.from_files(tmp_path / "run.server.key", keys / "client.key_secret")
    ).start()
    try:
        wait_for(lambda: sub.store.current_run is not None and sub.store.current_run.rows == 3)
    finally:
        sub.stop()
        cb.close()


def test_non_loopback_bind_needs_curve_or_insecure(tmp_path, monkeypatch):
    # Pretend 127.0.0.1 is a network address, so no test listens beyond loopback.
    monkeypatch.setattr(publisher_module, "is_loopback_address", lambda address: False)
    keys = tmp_path / "keys"
    keygen(keys)
    plain = _cb(free_address(), tmp_path / "a")
    with pytest.warns(RuntimeWarning, match="refusing to publish on non-loopback"):
        _steps(plain, 1, 3)
    assert not plain.publisher.bound
    plain.close()
    assert open(plain.log_path).read().count('"step_end"') == 3  # training and its log go on
    secured = _cb(free_address(), tmp_path / "b", keys_dir=str(keys))
    insecure = _cb(free_address(), tmp_path / "c", insecure=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _steps(secured, 1, 3)
        _steps(insecure, 1, 3)
    assert secured.publisher.bound and insecure.publisher.bound
    secured.close()
    insecure.close()


def test_without_curve_in_libzmq_both_sides_fail_closed(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keygen(keys)
    client = ClientCurve.from_keys_dir(keys)
    real_has = zmq.has
    monkeypatch.setattr(zmq, "has", lambda feature: False if feature == "curve" else real_has(feature))
    cb = _cb(free_address(), tmp_path, keys_dir=str(keys))
    with pytest.warns(RuntimeWarning, match="CURVE"):
        _steps(cb, 1, 5)
    assert not cb.publisher.bound
    cb.close()
    assert open(cb.log_path).read().count('"step_end"') == 5  # unmonitored, but the JSONL log has every step
    with pytest.raises(SecurityError, match="no CURVE"):
        ClientCurve.from_keys_dir(keys)
    sub = Subscriber(free_address(), curve=client).start()
    wait_for(lambda: sub.error is not None, message="client refuses")
    assert "CURVE" in sub.error and sub.store.connection == "unreachable"
    sub.stop()


def test_cli_options_to_a_client_config(tmp_path):
    keys = tmp_path / "keys"
    keygen(keys)
    assert client_from_options() is None
    assert isinstance(client_from_options(keys_dir=str(keys)), ClientCurve)
    assert isinstance(
        client_from_options(server_key=str(keys / "server.key"), client_key=str(keys / "client.key_secret")),
        ClientCurve,
    )
    with pytest.raises(SecurityError, match="go together"):
        client_from_options(server_key=str(keys / "server.key"))
    with pytest.raises(SecurityError, match="either"):
        client_from_options(server_key="a", client_key="b", keys_dir=str(keys))
    with pytest.raises(SecurityError, match="secret"):
        client_from_options(server_key=str(keys / "server.key"), client_key=str(keys / "client.key"))
    with pytest.raises(SecurityError, match="cannot read"):
        client_from_options(keys_dir=str(tmp_path / "missing"))


def test_other_ranks_forward_over_curve_with_the_runs_own_key(tmp_path):
    from rlhf_tui.bridge.training.forwarder import Forwarder

    keys = tmp_path / "keys"
    keygen(keys)
    address = free_address()
    cb = _cb(address, tmp_path, keys_dir=str(keys))
    _steps(cb, 1, 2)
    sub = Subscriber(address, curve=ClientCurve.from_keys_dir(keys)).start()
    fwd = Forwarder(
        address,
        "rank-run",
        lambda item: [("system", {"rss_mb": 12.5, "gpus": []}, 1)],
        rank=1,
        curve=ServerCurve.from_keys_dir(keys),
    )
    fwd.start()
    try:

        def arrived():
            fwd.put(("log",))
            run = sub.store.current_run
            return run is not None and 1 in run.system

        wait_for(arrived, timeout=10, interval=0.2, message="rank 1 sample over CURVE")
        assert sub.store.current_run.system[1]["rss_mb"] == 12.5
    finally:
        fwd.stop()
        sub.stop()
        cb.close()
