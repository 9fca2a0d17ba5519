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
file that becomes unreadable, empty or invalid keeps the keys read before, loudly.

A key file line may give the key a policy after it (`KeyPolicy`): `KEY name=alice tier=flex
max_images=4` -- the tenant name used in logs and metrics, the service tier `auto` means, and a
cap on the key's images in flight. The key that matched puts its policy in the request's scope
(`key_policy`); the endpoints copy it into the ImageRequest for the scheduler.

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
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from router.core.errors import error_response
from router.core.image_request import SERVICE_TIERS, ServiceTier
from router.edge.request_context import scope_log_tag

logger = logging.getLogger(__name__)

KEY_ENV = "GLM_API_KEY"
KEY_FILE_ENV = "GLM_API_KEY_FILE"
FAILURE_REASONS = ("missing", "malformed", "invalid")
# Printable ASCII without spaces or commas: safe in a header, and commas separate keys in $GLM_API_KEY.
_KEY = re.compile(r"^[\x21-\x2b\x2d-\x7e]+$")
_SHORT_KEY = 16
_RELOAD_CHECK_S = 1.0
# A tenant name: a short label, safe in logs and as a metrics label value.
_TENANT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_MAX_IMAGES = re.compile(r"^[0-9]{1,9}$")
_ATTRIBUTES = ("name", "tier", "max_images")
# The scope["state"] entry that carries the matched key's KeyPolicy to the endpoints.
_STATE_KEY = "api_key_policy"

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


def default_key_name(key: str) -> str:
    """The tenant name of a key without a `name=`: "key-" and the first 8 hex digits of its SHA-256
    (stable, and saying nothing usable about the key)."""
    return "key-" + hashlib.sha256(key.encode("latin-1")).hexdigest()[:8]


@dataclass(frozen=True)
class KeyPolicy:
    """What a key's line in the key file says about its requests (keys from flags and
    $GLM_API_KEY get only the default name)."""

    name: str  # the tenant: logs and metrics labels, and what the scheduler's cap and turns count by
    tier: ServiceTier | None = None  # the service tier `auto` (or no service_tier) means; None: "default"
    max_images: int | None = None  # cap on this tenant's images in flight; None: no cap


@dataclass(frozen=True)
class KeyEntry:
    key: str
    policy: KeyPolicy


def _parse_attributes(key: str, attributes: list[str], where: str) -> KeyPolicy:
    """The KeyPolicy of `key` from its line's `name=value` words. Messages name the attribute,
    never the key (nor a word that is not a well-formed attribute: it may be part of a key)."""
    values: dict[str, str] = {}
    for position, word in enumerate(attributes, start=2):
        attribute, equals, value = word.partition("=")
        if not equals or not re.match(r"^[a-z_]{1,32}$", attribute):
            raise ApiKeyError(f"{where}: word {position} is not an attribute (name=..., tier=..., max_images=...); "
                              "a key may not hold spaces")
        if attribute not in _ATTRIBUTES:
            raise ApiKeyError(f"{where}: unknown attribute {attribute!r} (known: {', '.join(_ATTRIBUTES)})")
        if attribute in values:
            raise ApiKeyError(f"{where}: attribute {attribute!r} is given twice")
        values[attribute] = value
    name = values.get("name", default_key_name(key))
    if not _TENANT_NAME.match(name):
        raise ApiKeyError(f"{where}: attribute 'name' must be 1 to 64 letters, digits, '_', '.' or '-'")
    tier = values.get("tier")
    if tier is not None and tier not in SERVICE_TIERS:
        raise ApiKeyError(f"{where}: attribute 'tier' must be one of {', '.join(SERVICE_TIERS)}")
    max_images = values.get("max_images")
    if max_images is not None and (not _MAX_IMAGES.match(max_images) or int(max_images) < 1):
        raise ApiKeyError(f"{where}: attribute 'max_images' must be a whole number of at least 1")
    return KeyPolicy(name, tier, int(max_images) if max_images is not None else None)  # type: ignore[arg-type]


def read_key_file(path: Path) -> tuple[KeyEntry, ...]:
    """The keys in `path` with their policies: one key per line, optionally followed by
    whitespace-separated attributes (`KEY name=alice tier=flex max_images=4`); blank lines and
    lines starting with `#` are ignored. Raises ApiKeyError naming the line (never the key)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiKeyError(f"cannot read the API key file {path}: {exc}") from None
    entries: list[KeyEntry] = []
    line_of_key: dict[str, int] = {}
    policy_of_name: dict[str, tuple[int, KeyPolicy]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        where = f"{path} line {number}"
        key = words[0]
        attribute, equals, _ = key.partition("=")
        if equals and attribute in _ATTRIBUTES:
            raise ApiKeyError(f"{where}: the line starts with an attribute; the key comes first")
        entry = KeyEntry(_validated(key, where), _parse_attributes(key, words[1:], where))
        if key in line_of_key:
            raise ApiKeyError(f"{where}: the same key as line {line_of_key[key]}")
        line_of_key[key] = number
        # Keys of one tenant (an old and a new key while rotating) share its cap: they must agree on it.
        earlier = policy_of_name.get(entry.policy.name)
        if earlier is not None and earlier[1] != entry.policy:
            raise ApiKeyError(f"{where}: name {entry.policy.name!r} has another tier or max_images on line "
                              f"{earlier[0]}; keys of one name share them")
        policy_of_name.setdefault(entry.policy.name, (number, entry.policy))
        entries.append(entry)
    if not entries:
        raise ApiKeyError(f"the API key file {path} holds no key (one per line; '#' starts a comment line)")
    return tuple(entries)


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
    """The accepted keys, as digests with their policies; the key file's are re-read when it changes."""

    def __init__(self, config: ApiKeyConfig):
        self.config = config
        self._static = [(_digest(key), KeyPolicy(default_key_name(key))) for key in config.keys]
        self._from_file: list[tuple[bytes, KeyPolicy]] = []
        self._file_stamp: tuple[int, int, int] | None = None
        self._checked_at = time.monotonic()
        short = sum(len(key) < _SHORT_KEY for key in config.keys)
        if config.key_file is not None:
            entries = read_key_file(config.key_file)
            short += sum(len(entry.key) < _SHORT_KEY for entry in entries)
            self._from_file = [(_digest(entry.key), entry.policy) for entry in entries]
            self._file_stamp = self._stamp()
        if short:
            logger.warning("%d API key(s) are shorter than %d characters: use long random keys "
                           "(e.g. `openssl rand -hex 32`)", short, _SHORT_KEY)

    def __len__(self) -> int:
        return len(self._static) + len(self._from_file)

    def matches(self, token: str) -> bool:
        """Whether `token` is one of the keys. Compares with every key, in constant time each."""
        return self.match(token) is not None

    def match(self, token: str) -> KeyPolicy | None:
        """The policy of the key `token` is, or None. Compares with every key, in constant time each,
        without stopping at a match; a key both in the file and given otherwise has the file's policy."""
        self._reload_if_changed()
        digest = _digest(token)
        found: KeyPolicy | None = None
        for key, policy in self._static + self._from_file:
            equal = hmac.compare_digest(digest, key)
            found = policy if equal else found
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
            entries = read_key_file(self.config.key_file)
        except ApiKeyError as exc:
            logger.error("%s; keeping the %d key(s) read from it before", exc, len(self._from_file))
            return
        self._from_file = [(_digest(entry.key), entry.policy) for entry in entries]
        logger.info("API key file %s changed: %d key(s) from it now", self.config.key_file, len(entries))


def key_policy(request: Request) -> KeyPolicy | None:
    """The policy of the API key that authenticated `request`; None when the router has no keys."""
    return request.scope.get("state", {}).get(_STATE_KEY)


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
        policy = self.keys.match(token) if token is not None else None
        if policy is not None:
            scope.setdefault("state", {})[_STATE_KEY] = policy
            await self.app(scope, receive, send)
            return
        reason = reason or "invalid"
        self.metrics.failures.labels(reason).inc()
        logger.info("[%s] %s %s -> 401: API key %s", scope_log_tag(scope), scope["method"], scope["path"], reason)
        response = error_response(401, _MESSAGES[reason], "invalid_request_error",
                                  headers={"WWW-Authenticate": _CHALLENGE[reason]}, code="invalid_api_key")
        await response(scope, receive, send)
