"""API keys on the HTTP edge: `Authorization: Bearer KEY`, as OpenAI's API and SDKs send it.

When any key is configured, every `/v1/*` route (and `/metrics`, `/metrics/*` with
`protect_metrics`) needs one of them; `/health`, `/ready`, the playground page and its files
stay open. The check runs in an ASGI middleware, before anything reads the body: a client
without a key cannot make the router read (or buffer) its upload. A refusal is a 401 in
OpenAI's error shape (`code: invalid_api_key`) with `WWW-Authenticate: Bearer`, logged with the
request id and the reason (missing, malformed, invalid), never the key, and counted in
`glm_router_http_auth_failures_total{reason}`.

Keys come from `--api-key` (repeatable; visible in `ps`), `$GLM_API_KEY` (comma separated) and
a key file (`--api-key-file` / `$GLM_API_KEY_FILE`: one key per line, `#` comment lines and
blank lines ignored; a mounted Kubernetes Secret). All of them are accepted at once, which is
how keys rotate (docs/http_security.md). The file is re-read when it changes (checked at most
once a second, on requests): a Secret update reaches a running router without a restart. A
file that becomes unreadable or empty keeps the keys read before, loudly.

Keys are kept only as SHA-256 digests and compared with `hmac.compare_digest` against every one
of them, without stopping at a match: the time taken says nothing about which key, or how much
of one, matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Receive, Scope, Send

from router.core.errors import error_response
from router.edge.request_context import scope_log_tag

logger = logging.getLogger(__name__)

KEY_ENV = "GLM_API_KEY"
KEY_FILE_ENV = "GLM_API_KEY_FILE"
FAILURE_REASONS = ("missing", "malformed", "invalid")
# Printable ASCII without spaces or commas: safe in a header, and commas separate keys in $GLM_API_KEY.
_KEY = re.compile(r"^[\x21-\x2b\x2d-\x7e]+$")
_SHORT_KEY = 16
_RELOAD_CHECK_S = 1.0

_MESSAGES = {
    "missing": "You didn't provide an API key. Send it in an Authorization header using Bearer auth "
               "(Authorization: Bearer YOUR_KEY).",
    "malformed": "The Authorization header is malformed: send exactly one, as 'Authorization: Bearer YOUR_KEY'.",
    "invalid": "Incorrect API key provided.",
}
_CHALLENGE = {"missing": "Bearer", "malformed": 'Bearer error="invalid_request"', "invalid": 'Bearer error="invalid_token"'}


class ApiKeyError(ValueError):
    """A key or key file that cannot be used; the message says which and why (never the key)."""


def _validated(key: str, where: str) -> str:
    if not key:
        raise ApiKeyError(f"{where}: the API key is empty")
    if not _KEY.match(key):
        raise ApiKeyError(f"{where}: an API key may only hold printable ASCII characters without spaces or commas")
    return key


def read_key_file(path: Path) -> tuple[str, ...]:
    """The keys in `path`: one per line; blank lines and lines starting with `#` are ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiKeyError(f"cannot read the API key file {path}: {exc}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(_validated(line, f"{path} line {number}"))
    if not keys:
        raise ApiKeyError(f"the API key file {path} holds no key (one per line; '#' starts a comment line)")
    return tuple(keys)


@dataclass(frozen=True)
class ApiKeyConfig:
    """Where the router's API keys come from. Built by `from_sources` at the edge: every key is
    checked there, and a key file that cannot be read is an error at start, not an open door."""

    keys: tuple[str, ...] = ()  # from --api-key and $GLM_API_KEY
    key_file: Path | None = None
    protect_metrics: bool = False  # /metrics and /metrics/* need a key too

    @classmethod
    def from_sources(cls, flag_keys: Sequence[str] | None = None, key_file: str | None = None,
                     environ: Mapping[str, str] = os.environ, protect_metrics: bool = False) -> "ApiKeyConfig | None":
        """Keys from the flags, then `$GLM_API_KEY` (comma separated), plus the key file (the flag's,
        else `$GLM_API_KEY_FILE`). None when there is no key at all (the API is open); raises
        ApiKeyError for an empty or unusable key, an unreadable or empty key file, or
        `protect_metrics` without any key."""
        keys = [_validated(key, "--api-key") for key in flag_keys or ()]
        keys += [_validated(key.strip(), f"${KEY_ENV}") for key in environ.get(KEY_ENV, "").split(",") if key.strip()]
        path = key_file or environ.get(KEY_FILE_ENV) or None
        config = cls(tuple(keys), Path(path) if path else None, protect_metrics)
        if config.key_file is not None:
            read_key_file(config.key_file)  # fail at start, with the reason
        if not config.keys and config.key_file is None:
            if protect_metrics:
                raise ApiKeyError("--protect-metrics needs an API key (--api-key, --api-key-file, $GLM_API_KEY or "
                                  "$GLM_API_KEY_FILE)")
            return None
        return config


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("latin-1")).digest()


class ApiKeys:
    """The accepted keys, as digests; the key file's are re-read when the file changes."""

    def __init__(self, config: ApiKeyConfig):
        self.config = config
        self._static = [_digest(key) for key in config.keys]
        self._from_file: list[bytes] = []
        self._file_stamp: tuple[int, int, int] | None = None
        self._checked_at = time.monotonic()
        short = sum(len(key) < _SHORT_KEY for key in config.keys)
        if config.key_file is not None:
            file_keys = read_key_file(config.key_file)
            short += sum(len(key) < _SHORT_KEY for key in file_keys)
            self._from_file = [_digest(key) for key in file_keys]
            self._file_stamp = self._stamp()
        if short:
            logger.warning("%d API key(s) are shorter than %d characters: use long random keys "
                           "(e.g. `openssl rand -hex 32`)", short, _SHORT_KEY)

    def __len__(self) -> int:
        return len(self._static) + len(self._from_file)

    def matches(self, token: str) -> bool:
        """Whether `token` is one of the keys. Compares with every key, in constant time each."""
        self._reload_if_changed()
        digest = _digest(token)
        found = False
        for key in self._static + self._from_file:
            found |= hmac.compare_digest(digest, key)
        return found

    def _stamp(self) -> tuple[int, int, int] | None:
        assert self.config.key_file is not None
        try:
            stat = self.config.key_file.stat()  # follows symlinks: a Secret update swaps one
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def _reload_if_changed(self) -> None:
        if self.config.key_file is None or time.monotonic() - self._checked_at < _RELOAD_CHECK_S:
            return
        self._checked_at = time.monotonic()
        stamp = self._stamp()
        if stamp == self._file_stamp:
            return
        self._file_stamp = stamp
        try:
            keys = read_key_file(self.config.key_file)
        except ApiKeyError as exc:
            logger.error("%s; keeping the %d key(s) read from it before", exc, len(self._from_file))
            return
        self._from_file = [_digest(key) for key in keys]
        logger.info("API key file %s changed: %d key(s) from it now", self.config.key_file, len(keys))


class AuthMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.failures = Counter(
            "glm_router_http_auth_failures", "Requests refused with 401 for want of a valid API key, by reason "
            "(missing: no Authorization header; malformed: not one 'Bearer KEY'; invalid: no such key)",
            ["reason"], registry=registry)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)


def bearer_token(headers: Sequence[tuple[bytes, bytes]]) -> tuple[str | None, str | None]:
    """(token, None) from the request's one `Authorization: Bearer TOKEN`, else (None, reason)."""
    values = [value for name, value in headers if name == b"authorization"]
    if not values:
        return None, "missing"
    if len(values) > 1:
        return None, "malformed"
    scheme, _, token = values[0].decode("latin-1").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None, "malformed"
    return token, None


class ApiKeyMiddleware:
    """Pure ASGI middleware: the protected routes need a valid key before anything else runs."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, metrics: AuthMetrics):
        self.app = app
        self.keys = keys
        self.metrics = metrics

    def protects(self, path: str) -> bool:
        if path == "/v1" or path.startswith("/v1/"):
            return True
        return self.keys.config.protect_metrics and (path == "/metrics" or path.startswith("/metrics/"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.protects(scope["path"]):
            await self.app(scope, receive, send)
            return
        token, reason = bearer_token(scope["headers"])
        if token is not None and self.keys.matches(token):
            await self.app(scope, receive, send)
            return
        reason = reason or "invalid"
        self.metrics.failures.labels(reason).inc()
        logger.info("[%s] %s %s -> 401: API key %s", scope_log_tag(scope), scope["method"], scope["path"], reason)
        response = error_response(401, _MESSAGES[reason], "invalid_request_error",
                                  headers={"WWW-Authenticate": _CHALLENGE[reason]}, code="invalid_api_key")
        await response(scope, receive, send)
