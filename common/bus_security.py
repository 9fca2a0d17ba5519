"""CurveZMQ on the bus: key files, socket set-up, and the router's ZAP allow-list.

With CURVE the bus is encrypted (a fresh session key per connection: forward secrecy) and both
ends authenticate by key: a worker must know the router's public key, and the router accepts a
worker only if its public key is in the allow-list directory. Keys are pyzmq's `zmq.auth`
certificate files (`NAME.key` public, `NAME.key_secret` both halves), as `glm-image-serve keygen`
writes them; they may be symlinks (a Kubernetes Secret volume mounts `NAME -> ..data/NAME`).

The allow-list is re-read whenever its directory's listing changes (names, inodes, mtimes,
checked on every handshake), so adding or removing a worker key needs no restart. Removing a key
refuses that worker's next connection; a connection already up stays up (ZAP runs once, at the
handshake). See docs/bus_security.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import zmq
import zmq.asyncio
import zmq.auth
from zmq.utils import z85

logger = logging.getLogger(__name__)

# The ZAP endpoint libzmq asks, fixed by RFC 27; our handler binds it in the router's context.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"glm-image-bus"

# keygen's layout (what `--curve-keys DIR` expects).
ROUTER_KEY_NAME = "router"
WORKERS_DIR = "workers"
ALLOWED_WORKERS_DIR = "allowed_workers"
DEFAULT_WORKER_NAMES = ("ar", "dit")

# Reasons on glm_router_workers_refused for handshakes the bus refuses.
REFUSED_UNKNOWN_KEY = "curve_unknown_key"  # a CURVE client whose key is not in the allow-list
REFUSED_NO_KEY = "curve_no_key"  # a client without CURVE (plaintext) at a CURVE router
REFUSED_BAD_HANDSHAKE = "curve_bad_handshake"  # e.g. a worker using the wrong router public key
REFUSED_UNEXPECTED_CURVE = "curve_unexpected"  # a CURVE client at a router without CURVE
HANDSHAKE_REFUSAL_REASONS = (REFUSED_UNKNOWN_KEY, REFUSED_NO_KEY, REFUSED_BAD_HANDSHAKE, REFUSED_UNEXPECTED_CURVE)


class BusSecurityError(ValueError):
    """A key file or key directory is missing, unreadable or not a CURVE key; says which and why."""


@dataclass(frozen=True)
class CurveKeyPair:
    """A CURVE keypair, both halves z85-encoded (40 characters)."""

    public: bytes
    secret: bytes

    @property
    def prefix(self) -> str:
        return key_prefix(self.public)


def key_prefix(public_key: bytes) -> str:
    """The first characters of a z85 public key: enough to tell keys apart in logs, not a secret."""
    return public_key[:8].decode("ascii", errors="replace")


def _check_z85(key: bytes, what: str, path: Path) -> bytes:
    try:
        if len(key) != 40 or len(z85.decode(key)) != 32:
            raise ValueError
    except (ValueError, KeyError, IndexError):
        raise BusSecurityError(f"{path}: the {what} is not a 40-character z85 CURVE key") from None
    return key


def _read_certificate(path: Path) -> tuple[bytes, bytes | None]:
    path = Path(path)
    if not path.is_file():  # follows symlinks, as Kubernetes Secret volumes have them
        raise BusSecurityError(f"{path}: no such key file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise BusSecurityError(f"{path}: not a CURVE certificate (zmq.auth format, as keygen writes): {exc}") from exc
    return _check_z85(public, "public key", path), secret


def load_public_key(path: Path) -> bytes:
    """The z85 public key in a `.key` (or `.key_secret`) certificate file."""
    return _read_certificate(path)[0]


def load_keypair(path: Path) -> CurveKeyPair:
    """Both halves from a `.key_secret` certificate file; the halves must belong together."""
    public, secret = _read_certificate(path)
    if secret is None:
        raise BusSecurityError(f"{path}: holds no secret key (pass the .key_secret file, not the public .key)")
    _check_z85(secret, "secret key", path)
    if zmq.curve_public(secret) != public:
        raise BusSecurityError(f"{path}: the public key does not belong to the secret key")
    return CurveKeyPair(public, secret)


@dataclass(frozen=True)
class RouterCurve:
    """The router's CURVE settings: its own keypair and the directory of accepted worker keys."""

    keypair: CurveKeyPair
    allow_dir: Path

    @classmethod
    def from_files(cls, secret_key_file: str | os.PathLike | None,
                   allow_dir: str | os.PathLike | None) -> "RouterCurve | None":
        """Both given: CURVE on; neither: None (plaintext). One without the other is an error."""
        if secret_key_file is None and allow_dir is None:
            return None
        if secret_key_file is None or allow_dir is None:
            raise BusSecurityError(
                "CURVE needs both --curve-secret-key (GLM_CURVE_SECRET_KEY: the router's .key_secret file) and "
                "--curve-allow-dir (GLM_CURVE_ALLOW_DIR: the directory of allowed worker public keys), or neither")
        allow = Path(allow_dir)
        if not allow.is_dir():
            raise BusSecurityError(f"{allow}: the CURVE allow-list directory does not exist")
        return cls(load_keypair(Path(secret_key_file)), allow)


@dataclass(frozen=True)
class WorkerCurve:
    """A worker's CURVE settings: the router's public key and the worker's own keypair."""

    router_key: bytes
    keypair: CurveKeyPair

    @classmethod
    def from_files(cls, router_key_file: str | os.PathLike | None,
                   secret_key_file: str | os.PathLike | None) -> "WorkerCurve | None":
        """Both given: CURVE on; neither: None (plaintext). One without the other is an error."""
        if router_key_file is None and secret_key_file is None:
            return None
        if router_key_file is None or secret_key_file is None:
            raise BusSecurityError(
                "CURVE needs both --curve-router-key (GLM_CURVE_ROUTER_KEY: the router's public .key file) and "
                "--curve-secret-key (GLM_CURVE_SECRET_KEY: this worker's .key_secret file), or neither")
        return cls(load_public_key(Path(router_key_file)), load_keypair(Path(secret_key_file)))


def configure_server(sock: zmq.Socket, curve: RouterCurve) -> None:
    """Make a (not yet bound) socket a CURVE server that asks ZAP about every client."""
    sock.curve_server = True
    sock.curve_secretkey = curve.keypair.secret
    sock.curve_publickey = curve.keypair.public
    sock.zap_domain = ZAP_DOMAIN


def configure_client(sock: zmq.Socket, curve: WorkerCurve) -> None:
    """Make a (not yet connected) socket a CURVE client of the router whose key `curve` holds."""
    sock.curve_serverkey = curve.router_key
    sock.curve_publickey = curve.keypair.public
    sock.curve_secretkey = curve.keypair.secret


class AllowList:
    """The worker public keys in a directory, re-read when the directory's listing changes.

    Dotfiles and dot-directories are ignored (Kubernetes keeps `..data` and `..TIMESTAMP` there;
    the visible names are symlinks through `..data`, so a Secret update changes their targets'
    inodes, which the listing's signature includes). A file that is not a public key is skipped
    with a warning. An unreadable directory allows nobody (fail closed) until it reads again.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._signature: tuple | None = None
        self._keys: dict[bytes, str] = {}  # z85 public key -> the file it came from

    def lookup(self, public_key: bytes) -> str | None:
        """The allow-list file name holding `public_key` (z85), or None when it is not allowed."""
        self.refresh()
        return self._keys.get(public_key)

    def refresh(self) -> None:
        """Re-read the keys if the listing changed since the last look (a scandir and a stat per file)."""
        try:
            entries = sorted((e.name, e.path) for e in os.scandir(self.directory) if not e.name.startswith("."))
            signature = tuple((name, *_stat_key(path)) for name, path in entries)
        except OSError as exc:
            if self._signature != ("unreadable",):
                logger.error("cannot read the CURVE allow-list %s: %s; refusing every new worker until it reads again",
                             self.directory, exc)
            self._signature, self._keys = ("unreadable",), {}
            return
        if signature == self._signature:
            return
        keys: dict[bytes, str] = {}
        for name, path in entries:
            if not os.path.isfile(path):
                continue  # a sub-directory
            try:
                keys[load_public_key(Path(path))] = name
            except BusSecurityError as exc:
                logger.warning("CURVE allow-list: skipping %s", exc)
        if keys:
            logger.info("CURVE allow-list %s: %d worker key(s): %s", self.directory, len(keys),
                        ", ".join(f"{n} ({key_prefix(k)}...)" for k, n in sorted(keys.items(), key=lambda kv: kv[1])))
        else:
            logger.warning("CURVE allow-list %s holds no worker key: no worker can join until one is added", self.directory)
        self._signature, self._keys = signature, keys


def _stat_key(path: str) -> tuple[int, int, int]:
    st = os.stat(path)  # follows the symlink: a Kubernetes ..data swap changes the inode
    return st.st_ino, st.st_mtime_ns, st.st_size


# Called with (reason, peer address, public key prefix or "") for every refused handshake.
RefusalHook = Callable[[str, str, str], None]


class ZapAuthenticator:
    """A ZAP handler (RFC 27) on the router's asyncio loop: allows a CURVE client whose public
    key is in `allow_list`, refuses anything else, and reports each refusal to `on_refused`.

    Must be started before the CURVE socket binds: with no handler bound, libzmq lets every
    client in. ZAP sees the peer's address and key, so this is where unknown keys are told.
    """

    def __init__(self, ctx: zmq.asyncio.Context, allow_list: AllowList, on_refused: RefusalHook):
        self.ctx, self.allow_list, self.on_refused = ctx, allow_list, on_refused
        self._socket: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.allow_list.refresh()
        sock = self.ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(ZAP_ENDPOINT)
        self._socket = sock
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="bus-zap")
        self._task.add_done_callback(self._on_done)

    @staticmethod
    def _on_done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            # Every later CURVE handshake would hang unanswered: say so loudly.
            logger.error("the ZAP handler stopped; no worker can connect until the router restarts",
                         exc_info=task.exception())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._socket is not None:
            self._socket.close(linger=0)

    async def _serve(self) -> None:
        while True:
            request = await self._socket.recv_multipart()
            try:
                reply = self._answer(request)
            except Exception:  # never leave libzmq without an answer, nor end the loop
                logger.exception("ZAP request failed; refusing the connection")
                reply = [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"internal error", b"", b""]
            await self._socket.send_multipart(reply)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        # version, request id, domain, address, identity, mechanism, credentials...
        if len(request) < 6:
            return [b"1.0", request[1] if len(request) > 1 else b"", b"400", b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism = request[:6]
        credentials = request[6:]
        peer = address.decode(errors="replace")

        def deny(reason: str, prefix: str, text: bytes) -> list[bytes]:
            self.on_refused(reason, peer, prefix)
            return [version, request_id, b"400", text, b"", b""]

        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return deny(REFUSED_NO_KEY, "", b"CURVE required")
        public = z85.encode(credentials[0])
        name = self.allow_list.lookup(public)
        if name is None:
            return deny(REFUSED_UNKNOWN_KEY, key_prefix(public), b"unknown key")
        logger.debug("ZAP: allowed %s (%s..., %s)", peer, key_prefix(public), name)
        # The user id (the allow-list file name) travels with every message as its "User-Id" property.
        return [version, request_id, b"200", b"OK", name.encode(), b""]


# ---------------------------------------------------------------------------
# keygen


@dataclass(frozen=True)
class GeneratedKeys:
    """What `write_keys` wrote: the router's files, each worker's, and the allow-list directory."""

    out_dir: Path
    router_public: Path
    router_secret: Path
    workers: dict[str, tuple[Path, Path]]  # name -> (public .key, secret .key_secret)
    allow_dir: Path

    def describe(self) -> str:
        """Which file goes where, for a person."""
        lines = [f"CURVE keys written to {self.out_dir}:",
                 f"  {self.router_secret}  router only (--curve-secret-key); secret, mode 0600",
                 f"  {self.router_public}  every worker (--curve-router-key); public",
                 f"  {self.allow_dir}/  router (--curve-allow-dir): the public keys of the workers it accepts"]
        for name, (public, secret) in self.workers.items():
            lines.append(f"  {secret}  worker(s) {name!r} only (--curve-secret-key); secret, mode 0600")
            lines.append(f"  {public}  its public key (copied into {ALLOWED_WORKERS_DIR}/)")
        lines.append(f"Launch with: glm-image-serve launch --curve-keys {self.out_dir} ... (or GLM_CURVE_KEYS={self.out_dir})")
        return "\n".join(lines)


def keygen_layout(out_dir: Path, worker_names: list[str] | tuple[str, ...]) -> GeneratedKeys:
    """The paths keygen writes for `worker_names` under `out_dir` (nothing is written)."""
    out_dir = Path(out_dir)
    workers = {n: (out_dir / WORKERS_DIR / f"{n}.key", out_dir / WORKERS_DIR / f"{n}.key_secret") for n in worker_names}
    return GeneratedKeys(out_dir, out_dir / f"{ROUTER_KEY_NAME}.key", out_dir / f"{ROUTER_KEY_NAME}.key_secret",
                         workers, out_dir / ALLOWED_WORKERS_DIR)


def check_worker_name(name: str) -> str:
    """A worker key name becomes a file name: letters, digits, '-', '_' and '.', not leading '.'."""
    if not name or name.startswith(".") or not all(c.isalnum() or c in "-_." for c in name):
        raise BusSecurityError(f"worker key name {name!r}: use letters, digits, '-', '_' or '.', not starting with '.'")
    return name


def write_keys(out_dir: str | os.PathLike, worker_names: list[str] | tuple[str, ...] = DEFAULT_WORKER_NAMES,
               overwrite: bool = False) -> GeneratedKeys:
    """Generate the router's keypair and one keypair per worker name under `out_dir`, plus the
    allow-list directory holding the workers' public keys. Refuses to replace existing key files
    unless `overwrite`. Secret files are mode 0600 from the start (made in a private temporary
    directory, then moved into place)."""
    names = [check_worker_name(n) for n in worker_names]
    if len(set(names)) != len(names):
        raise BusSecurityError(f"worker key names repeat: {names}")
    if ROUTER_KEY_NAME in names:
        raise BusSecurityError(f"{ROUTER_KEY_NAME!r} is the router's key name; pick another worker name")
    layout = keygen_layout(Path(out_dir), names)
    targets = [layout.router_public, layout.router_secret]
    for public, secret in layout.workers.values():
        targets += [public, secret, layout.allow_dir / public.name]
    existing = [p for p in targets if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise BusSecurityError(f"{existing[0]} exists ({len(existing)} key file(s) would be replaced); "
                               "pass --overwrite to replace them (every worker then needs its new key)")
    for directory in (layout.out_dir, layout.out_dir / WORKERS_DIR, layout.allow_dir):
        directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=layout.out_dir, prefix=".keygen-") as tmp:  # 0700: nobody else reads it
        def make(name: str, public_dest: Path, secret_dest: Path) -> None:
            public, secret = zmq.auth.create_certificates(tmp, name)
            os.chmod(secret, 0o600)
            os.chmod(public, 0o644)
            os.replace(secret, secret_dest)
            os.replace(public, public_dest)

        make(ROUTER_KEY_NAME, layout.router_public, layout.router_secret)
        for name, (public, secret) in layout.workers.items():
            make(name, public, secret)
            allowed = layout.allow_dir / public.name
            shutil.copyfile(public, allowed)
            os.chmod(allowed, 0o644)
    return layout
