"""CURVE encryption and authentication from the key files of `pg2-server keys`.

`ClientKeys` is what a connecting peer (client, worker) needs; `ServerKeys` what a binding one
(server, broker) needs, with the folders of the public keys it lets in.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth


@dataclass(frozen=True)
class ClientKeys:
    """CURVE keys of a client or worker: the server's public key and this peer's key pair (z85 bytes)."""
    server_public: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_files(cls, server_public_file, client_secret_file) -> "ClientKeys":
        """Load `server.key` and this peer's `NAME.key_secret` (from `pg2-server keys`)."""
        for path in (server_public_file, client_secret_file):
            if not os.path.isfile(path):
                raise ValueError(f"CURVE key file {path} does not exist")
        server_public, _ = zmq.auth.load_certificate(str(server_public_file))
        client_public, client_secret = zmq.auth.load_certificate(str(client_secret_file))
        if client_secret is None:
            raise ValueError(f"{client_secret_file} holds no secret key; pass the NAME.key_secret file")
        return cls(server_public, client_public, client_secret)

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` (before connect) a CURVE client of the server."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.client_public
        sock.curve_secretkey = self.client_secret


@dataclass(frozen=True)
class ServerKeys:
    """CURVE settings of a server or broker: its certificate (with secret key) and the folders of
    authorised public keys, one for clients and, on a broker, one for workers (either may be None)."""
    secret_file: Path
    clients_dir: Path | None = None
    workers_dir: Path | None = None

    def check(self) -> None:
        if not Path(self.secret_file).is_file():
            raise ValueError(f"CURVE secret certificate {self.secret_file} does not exist; create one with "
                             "`pg2-server keys DIR server`")
        for what, folder in (("client", self.clients_dir), ("worker", self.workers_dir)):
            if folder is None:
                continue
            if not Path(folder).is_dir():
                raise ValueError(f"CURVE {what} key directory {folder} does not exist; put the {what}s' "
                                 "NAME.key files there")
            # pyzmq loads a folder with one unreadable key as no keys at all (and only logs it):
            # every client would be refused by a server that seemed to start well.
            try:
                keys = zmq.auth.load_certificates(str(folder))
            except Exception as e:
                raise ValueError(f"CURVE {what} key directory {folder} holds a key that cannot be read ({e}); "
                                 "remove or replace it (`pg2-server keys` writes them)") from None
            if not keys:
                raise ValueError(f"CURVE {what} key directory {folder} holds no NAME.key public keys: no {what} "
                                 "could connect; copy the authorised ones there")

    @property
    def domains(self) -> dict[str, Path]:
        """ZAP domain → folder of the public keys it accepts."""
        return {domain: Path(folder) for domain, folder in (("clients", self.clients_dir),
                                                            ("workers", self.workers_dir)) if folder is not None}


log = logging.getLogger("pg2_server.auth")


class FolderKeys:
    """The public keys in a folder, read again whenever the folder changes, so that a key removed
    from it is refused at the next handshake and one added is let in, without a restart (the
    connections already open stay). A folder that cannot be read keeps the keys last read."""

    def __init__(self, folder: Path, what: str):
        self.folder, self.what = Path(folder), what
        self.changed: tuple | None = None
        self.keys: set[bytes] = set()

    def _state(self) -> tuple:
        """What changes when a key file is added, removed or replaced."""
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in self.folder.glob("*.key")))

    def current(self) -> set[bytes]:
        try:
            state = self._state()
            if state != self.changed:
                self.keys = set(zmq.auth.load_certificates(str(self.folder)))
                if self.changed is not None:
                    log.info("CURVE: %s keys in %s read again: %d authorised", self.what, self.folder, len(self.keys))
                self.changed = state
        except Exception as e:   # a key half-written or unreadable: keep the set last read
            log.error("CURVE: cannot read the %s keys in %s (%s); keeping the %d read before",
                      self.what, self.folder, e, len(self.keys))
        return self.keys

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP's credentials check for one handshake (`key`: the peer's z85 public key)."""
        allowed = key in self.current()
        if not allowed:
            log.warning("CURVE: refused a %s whose key %s is not in %s", self.what, key.decode(errors="replace"),
                        self.folder)
        return allowed


def start_authenticator(context: zmq.Context, keys: ServerKeys | None):
    """One ZAP handler for `context` that accepts, per domain, only the public keys in its folder,
    as the folder holds them at each handshake."""
    from zmq.auth.thread import ThreadAuthenticator

    if keys is None or not keys.domains:
        return None
    keys.check()
    authenticator = ThreadAuthenticator(context, log=log)
    authenticator.start()
    for domain, folder in keys.domains.items():
        provider = FolderKeys(folder, domain.removesuffix("s"))
        provider.current()
        authenticator.configure_curve_callback(domain=domain, credentials_provider=provider)
    return authenticator


def curve_server(sock: zmq.Socket, keys: ServerKeys, domain: str) -> None:
    """Make `sock` (before bind) a CURVE server whose peers are checked against `domain`'s keys."""
    public, secret = zmq.auth.load_certificate(str(keys.secret_file))
    if secret is None:
        raise ValueError(f"{keys.secret_file} holds no secret key; pass the NAME.key_secret file")
    sock.zap_domain = domain.encode()
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def secure_socket(context: zmq.Context, sock: zmq.Socket, keys: ServerKeys | None):
    """Make `sock` a CURVE server that accepts only the public keys in `keys.clients_dir`."""
    if keys is None:
        return None
    if keys.clients_dir is None:
        raise ValueError("CURVE on a server needs the folder of authorised client keys")
    authenticator = start_authenticator(context, keys)
    curve_server(sock, keys, "clients")
    return authenticator
