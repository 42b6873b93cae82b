"""CurveZMQ on the broker link: key files, socket setup, and who may join.

On one host the broker link is an ipc:// socket in a private directory, and the file
system is its access control. Across hosts it is TCP, where anyone who can reach the
port could otherwise join as a worker, read every event and roster, and feed the broker
whatever it likes. So a TCP link is encrypted and both ends are authenticated with
ZeroMQ's CURVE mechanism:

* the broker has a key pair; every worker host is given the broker's *public* key, and
  a worker refuses to talk to a broker that cannot prove it holds the matching secret;
* every worker has a key pair too; the broker accepts a worker only when the worker's
  public key is a file in its authorized-keys directory (a ZAP handler, run by
  :class:`zmq.auth.thread.ThreadAuthenticator` in a thread of its own, because the
  broker's loop is a blocking poll that must not wait on anything else).

The key files are the ones ``zmq.auth`` reads and writes (a text "certificate" with a
``public-key`` line, plus a ``secret-key`` line in the ``.key_secret`` file). ``vask
keys`` creates them (:func:`generate`) with owner-only permissions.

A plain TCP link is still allowed to a loopback address (it never leaves the machine)
or with ``insecure_broker = true``, for a network the operator trusts for other reasons
(a WireGuard tunnel, say); :func:`check_link` enforces that rule.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq
import zmq.auth

from vask.config import ConfigError, Settings

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("vask.curve")

#: the names `vask keys` writes (docs/security.md, "The broker link across hosts")
BROKER_NAME = "broker"
AUTHORIZED_DIR = "authorized"


def endpoints(value: str) -> list[str]:
    """The broker endpoints in a ``broker`` setting (a comma-separated list)."""
    return [part.strip() for part in value.split(",") if part.strip()]


def is_tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


def is_loopback(endpoint: str) -> bool:
    """Whether a tcp:// endpoint's host is a loopback address (or ``localhost``)."""
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or an interface name: assume it leaves the host


def _load(path: str, where: str, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read a CURVE key from {path!r} ({exc})") from None
    if len(public) != 40:
        raise ConfigError(f"{where}: {path!r} holds no valid public key")
    if secret and (secret_key is None or len(secret_key) != 40):
        raise ConfigError(f"{where}: {path!r} holds no secret key (use the .key_secret "
                          "file `vask keys` wrote)")
    return public, secret_key


def check_keys(settings: Settings) -> None:
    """Each configured key file and directory can be read and holds a usable key."""
    if settings.curve_secret_key:
        _load(settings.curve_secret_key, "server.curve_secret_key", secret=True)
    if settings.broker_public_key:
        _load(settings.broker_public_key, "server.broker_public_key", secret=False)
    if settings.authorized_keys_dir:
        folder = Path(settings.authorized_keys_dir)
        if not folder.is_dir():
            raise ConfigError(f"server.authorized_keys_dir: {str(folder)!r} is not a directory")
        keys = sorted(folder.glob("*.key"))
        if not keys:
            raise ConfigError(f"server.authorized_keys_dir: no *.key file in {str(folder)!r}")
        for key in keys:
            _load(str(key), "server.authorized_keys_dir", secret=False)


def check_link(settings: Settings, role: str, endpoint_list: list[str]) -> list[str]:
    """Refuse a plain TCP broker link that leaves the host; return warnings.

    ``role`` is ``"broker"`` (binding ``endpoint_list``) or ``"worker"`` (connecting).
    A link is encrypted when the keys its role needs are set; without them, a tcp://
    endpoint that is not loopback needs ``insecure_broker``.
    """
    if role == "broker":
        secure = bool(settings.curve_secret_key and settings.authorized_keys_dir)
        needs = "curve_secret_key (the broker's .key_secret) and authorized_keys_dir"
    else:
        secure = bool(settings.curve_secret_key and settings.broker_public_key)
        needs = "curve_secret_key (this host's worker .key_secret) and broker_public_key"
    warnings = []
    for endpoint in endpoint_list:
        if not is_tcp(endpoint) or secure or is_loopback(endpoint):
            continue
        if not settings.insecure_broker:
            raise ConfigError(
                f"server.broker: {endpoint} is a TCP link off this host without CURVE "
                f"keys; set {needs} (create them with `vask keys`), or insecure_broker "
                "= true on a network you trust")
        warnings.append(f"the broker link {endpoint} is neither encrypted nor authenticated "
                        "(insecure_broker): anyone who reaches it can join the cluster")
    return warnings


def secure_server(sock: zmq.Socket[Any], settings: Settings) -> bool:
    """Make ``sock`` a CURVE server if the broker's keys are configured."""
    if not (settings.curve_secret_key and settings.authorized_keys_dir):
        return False
    _own_keys(sock, settings)
    sock.curve_server = True
    return True


def secure_client(sock: zmq.Socket[Any], settings: Settings) -> bool:
    """Make ``sock`` a CURVE client of the broker if a worker's keys are configured."""
    if not (settings.curve_secret_key and settings.broker_public_key):
        return False
    _own_keys(sock, settings)
    sock.curve_serverkey = _load(settings.broker_public_key, "server.broker_public_key",
                                 False)[0]
    return True


def _own_keys(sock: zmq.Socket[Any], settings: Settings) -> None:
    """Give ``sock`` this host's key pair (``curve_secret_key``)."""
    public, secret = _load(settings.curve_secret_key, "server.curve_secret_key", True)
    sock.curve_secretkey = secret
    sock.curve_publickey = public


def start_authenticator(context: zmq.Context[Any], settings: Settings) -> ThreadAuthenticator:
    """The ZAP handler that admits only the authorized workers' public keys.

    It lives in its own thread on the broker's context; ZeroMQ consults it during each
    CURVE handshake, so the broker's poll loop never sees a peer that failed it.
    Imported here: ``zmq.auth.thread`` brings asyncio (about 8 MiB of a process's
    memory), which a broker without CURVE never needs.
    """
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(context, log=logging.getLogger("vask.curve.zap"))
    auth.start()
    auth.configure_curve(domain="*", location=settings.authorized_keys_dir)
    return auth


def generate(folder: Path, workers: list[str]) -> list[Path]:
    """Create the broker's key pair (unless present) and one pair per worker name in
    ``folder`` (mode 0700, secret files 0600), and copy the workers' public keys into
    ``folder/authorized``. Returns the files written. Existing files are never
    overwritten: a second run only adds the missing ones."""
    written: list[Path] = []
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    authorized = folder / AUTHORIZED_DIR
    authorized.mkdir(exist_ok=True)
    authorized.chmod(0o700)
    old_umask = os.umask(0o077)  # no moment where a secret file is readable by others
    try:
        for name in [BROKER_NAME, *workers]:
            public = folder / f"{name}.key"
            secret = folder / f"{name}.key_secret"
            if public.exists() or secret.exists():
                continue
            zmq.auth.create_certificates(folder, name)
            secret.chmod(0o600)
            public.chmod(0o644)
            written += [public, secret]
            if name != BROKER_NAME:
                copy = authorized / public.name
                shutil.copyfile(public, copy)
                copy.chmod(0o644)
                written.append(copy)
    finally:
        os.umask(old_umask)
    return written
