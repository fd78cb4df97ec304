"""Who may talk to pdserve's ZeroMQ sockets: CURVE keys, and the loopback-only rule.

A deployment has one CURVE key pair (`pdserve keys DIR` writes it; every role names the
secret file with `--curve-keys`). Holding the secret file is what makes a process a member:

- sockets that bind (the router's control socket, a decode worker's KV socket) are CURVE
  servers with that key pair, and a ZAP handler admits only clients whose public key is
  the deployment's, i.e. clients that proved they hold its secret key;
- sockets that connect (a worker's link to the router, a prefill worker's KV sockets) are
  CURVE clients with the same pair and the deployment public key as the server key.

Traffic is then encrypted and a stranger's handshake fails before any frame reaches our
code. Without keys, a socket may bind only to loopback (or ipc://); anything else needs
`--insecure`, said out loud.
"""
from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import zmq

log = logging.getLogger(__name__)

KEY_NAME = "pdserve"   # files: pdserve.key (public), pdserve.key_secret (both halves)


class InsecureBind(ValueError):
    """A socket would bind to a non-loopback address without CURVE keys or --insecure."""


@dataclass(frozen=True)
class CurveKeys:
    public: bytes   # z85, 40 bytes
    secret: bytes

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CurveKeys":
        """From a secret key file written by `pdserve keys` (or zmq.auth.create_certificates)."""
        import zmq.auth

        public, secret = zmq.auth.load_certificate(str(path))
        if not secret:
            raise ValueError(f"{path} holds no secret key: name the *.key_secret file")
        return cls(public, secret)

    def server(self, sock: zmq.Socket) -> None:
        """Before bind(): this socket answers CURVE handshakes with the deployment key."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def client(self, sock: zmq.Socket) -> None:
        """Before connect(): this socket authenticates as a member and checks the server is one."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.public

    def authenticator(self, ctx: zmq.Context):
        """A running ZAP handler on `ctx` that admits only this deployment's public key.
        Stop it (`.stop()`) before terminating the context."""
        from zmq.auth.thread import ThreadAuthenticator

        keys = self

        class _Members:
            def callback(self, domain: str, client_key: bytes) -> bool:
                ok = client_key == keys.public
                if not ok:
                    log.warning("refused a CURVE client with an unknown public key")
                return ok

        auth = ThreadAuthenticator(ctx, log=logging.getLogger("pdserve.zap"))
        auth.start()
        auth.configure_curve_callback(domain="*", credentials_provider=_Members())
        return auth

    # Context defaults apply to every socket made on the context afterwards: this is how the KV
    # transfer sockets, which kvtransfer creates itself, get CURVE without kvtransfer knowing.
    def server_context(self, io_threads: int = 1) -> tuple[zmq.Context, object]:
        """A context whose sockets are CURVE servers admitting only members, and its running ZAP
        handler (started first: its own inproc socket must stay plain)."""
        ctx = zmq.Context(io_threads=io_threads)
        auth = self.authenticator(ctx)
        ctx.curve_secretkey, ctx.curve_publickey, ctx.curve_server = self.secret, self.public, True
        return ctx, auth

    def client_context(self, io_threads: int = 1) -> zmq.Context:
        ctx = zmq.Context(io_threads=io_threads)
        ctx.curve_secretkey, ctx.curve_publickey, ctx.curve_serverkey = self.secret, self.public, self.public
        return ctx


def write_keys(directory: str | os.PathLike) -> tuple[Path, Path]:
    """Writes a new key pair into `directory`; returns (public file, secret file). Refuses to
    overwrite: replacing a deployment's key locks every running process out."""
    import zmq.auth

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = d / f"{KEY_NAME}.key", d / f"{KEY_NAME}.key_secret"
    for f in (public, secret):
        if f.exists():
            raise FileExistsError(f"{f} exists; remove it first or choose another directory")
    old = os.umask(0o077)  # the secret file must never be readable by others, not even briefly
    try:
        zmq.auth.create_certificates(str(d), KEY_NAME)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret


def is_loopback(address: str) -> bool:
    """ipc:// and inproc:// endpoints, and tcp:// on 127.0.0.0/8, ::1 or localhost."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0]
    host = host.split(";")[-1]      # "src;dst" form: the part we bind or connect to
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False                 # *, an interface name or a host name: not provably local


def check_bind(address: str, keys: CurveKeys | None, insecure: bool, what: str) -> None:
    """Raises InsecureBind if `what` would listen beyond this host unauthenticated."""
    if keys is not None or is_loopback(address):
        return
    if insecure:
        log.warning("%s binds %s without CURVE keys (--insecure): anyone who can reach it can "
                    "send it work", what, address)
        return
    raise InsecureBind(f"{what} would bind {address}, which is not a loopback address, without "
                       f"authentication: give --curve-keys FILE (write a pair with `pdserve keys DIR`) "
                       f"or, on a network you trust entirely, --insecure")


def keys_from(path: str | None) -> CurveKeys | None:
    """`--curve-keys PATH`, else the PDSERVE_CURVE_KEYS environment variable, else None."""
    path = path or os.environ.get("PDSERVE_CURVE_KEYS") or None
    return CurveKeys.load(path) if path else None
