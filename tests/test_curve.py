"""CURVE key files and the rule that a TCP broker link off the host is encrypted
(vask/curve.py), and the broker list setting (no sockets)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from vask import curve
from vask.config import ConfigError, Settings, load_settings


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_written_private_and_never_overwritten(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    written = curve.generate(folder, ["web1"])
    assert {p.name for p in written} == {"broker.key", "broker.key_secret", "web1.key",
                                         "web1.key_secret"}
    assert _mode(folder) == 0o700 and _mode(folder / "authorized") == 0o700
    assert _mode(folder / "broker.key_secret") == 0o600
    assert _mode(folder / "web1.key_secret") == 0o600
    assert (folder / "authorized" / "web1.key").read_text() == \
        (folder / "web1.key").read_text()
    before = (folder / "broker.key_secret").read_text()
    again = curve.generate(folder, ["web1", "web2"])
    assert {p.name for p in again} == {"web2.key", "web2.key_secret"}
    assert (folder / "broker.key_secret").read_text() == before


def test_key_files_are_checked(tmp_path: Path) -> None:
    curve.generate(tmp_path, ["web1"])
    good = Settings(curve_secret_key=str(tmp_path / "web1.key_secret"),
                    broker_public_key=str(tmp_path / "broker.key"),
                    authorized_keys_dir=str(tmp_path / "authorized"))
    curve.check_keys(good)
    with pytest.raises(ConfigError, match="holds no secret key"):
        curve.check_keys(Settings(curve_secret_key=str(tmp_path / "web1.key")))
    with pytest.raises(ConfigError, match="cannot read"):
        curve.check_keys(Settings(broker_public_key=str(tmp_path / "missing.key")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no \*\.key file"):
        curve.check_keys(Settings(authorized_keys_dir=str(tmp_path / "empty")))


@pytest.mark.parametrize("endpoint, loopback", [
    ("tcp://127.0.0.1:7001", True), ("tcp://localhost:7001", True),
    ("tcp://[::1]:7001", True), ("tcp://10.0.0.5:7001", False),
    ("tcp://0.0.0.0:7001", False), ("tcp://broker.internal:7001", False)])
def test_loopback(endpoint: str, loopback: bool) -> None:
    assert curve.is_loopback(endpoint) is loopback


def test_plain_tcp_off_the_host_is_refused_unless_insecure() -> None:
    off = ["tcp://10.0.0.5:7001"]
    for role in ("broker", "worker"):
        with pytest.raises(ConfigError, match="without CURVE keys"):
            curve.check_link(Settings(), role, off)
        assert curve.check_link(Settings(), role, ["tcp://127.0.0.1:7001", "ipc:///x"]) == []
        warnings = curve.check_link(Settings(insecure_broker=True), role, off)
        assert len(warnings) == 1 and "neither encrypted" in warnings[0]
    # each role needs its own pair of keys
    worker_keys = Settings(curve_secret_key="s", broker_public_key="p")
    assert curve.check_link(worker_keys, "worker", off) == []
    with pytest.raises(ConfigError):
        curve.check_link(worker_keys, "broker", off)
    assert curve.check_link(Settings(curve_secret_key="s", authorized_keys_dir="d"),
                            "broker", off) == []


def test_broker_list_setting() -> None:
    s = load_settings(env={"VASK_BROKER": "tcp://10.0.0.5:7001, tcp://10.0.0.6:7001",
                           "VASK_INSECURE_BROKER": "yes"})
    assert curve.endpoints(s.broker) == ["tcp://10.0.0.5:7001", "tcp://10.0.0.6:7001"]
    assert s.insecure_broker is True
    with pytest.raises(ConfigError, match="must start with"):
        load_settings(env={"VASK_BROKER": "tcp://a:1,udp://b:2"})
    with pytest.raises(ConfigError, match="twice"):
        load_settings(env={"VASK_BROKER": "tcp://a:1,tcp://a:1"})
