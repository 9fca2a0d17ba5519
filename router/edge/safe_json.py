"""Parsing untrusted JSON bodies with limits on their structure, not only on their size.

A body within the byte limit can still be hostile: 100k nested `[` (the C parser recurses
and dies with RecursionError), a million tiny values (`[{},{},...]` turns 100 MB into GBs of
Python objects), a number with 100k digits (int() refuses past 4300 digits with a ValueError,
and would be quadratic before that), `NaN` or `1e999999` (not JSON numbers, or not finite),
duplicate keys (which one counts is ambiguous), lone surrogates (`"\\ud800"` parses, then fails
to encode to UTF-8 deep inside the server), or another encoding than UTF-8.

`parse_json_body` refuses all of these with an `InvalidRequest` (400) whose message names the
problem and, where there is one, the field (`messages[0].content: ...`), and it does so before
building Python objects where it can: the encoding is checked on the bytes, the nesting depth and
the number of values on a skeleton of the text with every string taken out (one regular expression
pass in C; the large part of a legitimate body is base64 inside strings), and only then does
`json.loads` run, with hooks that check numbers, constants and keys as they are parsed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from router.core.errors import InvalidRequest


@dataclass(frozen=True)
class JsonLimits:
    """Structure limits of a JSON request body. Legitimate bodies of this API nest about 6 levels
    (chat: messages -> content -> part -> image_url -> url) and hold tens of values; the limits leave
    plenty of room for long chat histories while bounding the objects one request can create."""

    max_depth: int = 32
    max_values: int = 10_000  # arrays, objects, their items and members, all together
    max_number_chars: int = 40  # 2**64 has 20 digits; a float's repr needs at most 24 characters


# A complete JSON string (escapes included), as the parser reads it; the unrolled loop is linear.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
# Byte patterns of the first two characters of a JSON text ("{" or "[") in other encodings.
_BOMS = [
    (b"\xef\xbb\xbf", "UTF-8 with a byte order mark"),
    (b"\xff\xfe\x00\x00", "UTF-32 (little-endian, with a byte order mark)"),
    (b"\x00\x00\xfe\xff", "UTF-32 (big-endian, with a byte order mark)"),
    (b"\xff\xfe", "UTF-16 (little-endian, with a byte order mark)"),
    (b"\xfe\xff", "UTF-16 (big-endian, with a byte order mark)"),
]


class _Invalid:
    """Put in the parsed tree by the parser's hooks where a value is not acceptable; `_check` then
    reports it with its path (the hooks themselves do not know where they are)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def parse_json_body(body: bytes, limits: JsonLimits = JsonLimits()) -> Any:
    """The JSON value of a request body; `InvalidRequest` (400) saying what is wrong otherwise."""
    text = _decode_utf8(body)
    _check_structure(text, limits)

    def number(kind: str):
        def parse(token: str) -> Any:
            if len(token) > limits.max_number_chars:
                return _Invalid(f"a number of {len(token)} characters is too long; numbers may have at most "
                                f"{limits.max_number_chars}")
            value = int(token) if kind == "int" else float(token)
            if kind == "float" and not math.isfinite(value):
                return _Invalid(f"{token} is out of range (it is not a finite number)")
            return value
        return parse

    def constant(name: str) -> _Invalid:
        return _Invalid(f"{name} is not valid JSON; send a finite number (or null)")

    def members(pairs: list[tuple[str, Any]]) -> Any:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
            return _Invalid(f"key {_quote(duplicate)} appears more than once in one object; duplicate keys are ambiguous")
        return obj

    try:
        value = json.loads(text, parse_int=number("int"), parse_float=number("float"), parse_constant=constant,
                           object_pairs_hook=members)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # unreachable after _check_structure; a 400 all the same if it ever is not
        raise InvalidRequest(f"JSON nesting is too deep; at most {limits.max_depth} levels are accepted") from None
    _check(value, "")
    return value


def _decode_utf8(body: bytes) -> str:
    for bom, name in _BOMS:
        if body.startswith(bom):
            raise InvalidRequest(f"request body is not valid JSON: it is {name}; JSON bodies must be UTF-8 "
                                 "without a byte order mark (RFC 8259)")
    kind = _wide_encoding(body[:4])
    if kind:
        raise InvalidRequest(f"request body is not valid JSON: it looks like {kind}; JSON bodies must be UTF-8 "
                             "(RFC 8259)")
    try:
        return body.decode("utf-8")  # strict: invalid bytes, overlong forms and encoded surrogates all fail here
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: it is not valid UTF-8 (byte {exc.start}, "
                             f"{body[exc.start:exc.start + 1]!r}: {exc.reason}); JSON bodies must be UTF-8") from None


def _wide_encoding(head: bytes) -> str | None:
    """UTF-16 or UTF-32 without a byte order mark, told by the NULs around the first character (JSON
    text starts with an ASCII one: RFC 4627's detection)."""
    if len(head) == 4 and head[:3] == b"\x00\x00\x00" and head[3]:
        return "UTF-32 (big-endian)"
    if len(head) == 4 and head[0] and head[1:] == b"\x00\x00\x00":
        return "UTF-32 (little-endian)"
    if len(head) >= 2 and not head[0] and head[1]:
        return "UTF-16 (big-endian)"
    if len(head) >= 2 and head[0] and not head[1]:
        return "UTF-16 (little-endian)"
    return None


def _check_structure(text: str, limits: JsonLimits) -> None:
    """Depth and value count, on the text without its strings, before anything is built."""
    skeleton = _STRING.sub("", text)
    # Every value but the first is preceded by a comma, or opens a container: an upper bound that
    # costs two C-level counts, not a parse.
    values = skeleton.count(",") + skeleton.count("[") + skeleton.count("{")
    depth = 0
    for index, bracket in enumerate(_BRACKET.finditer(skeleton)):
        if index > 2 * limits.max_values:
            break  # more containers than values allowed: refused just below
        if bracket.group() in "[{":
            depth += 1
            if depth > limits.max_depth:
                raise InvalidRequest(f"JSON nesting is more than {limits.max_depth} levels deep; at most "
                                     f"{limits.max_depth} are accepted")
        else:
            depth -= 1
    if values > limits.max_values:
        raise InvalidRequest(f"JSON body has about {values} values (array items, object members); at most "
                             f"{limits.max_values} are accepted")


def _check(value: Any, path: str) -> None:
    """Refuse what the hooks marked, and strings that cannot travel as UTF-8 text (recursion
    bounded by the depth limit checked before)."""
    if isinstance(value, _Invalid):
        raise InvalidRequest(f"{path}: {value.reason}" if path else value.reason)
    if isinstance(value, str):
        _check_string(value, path)
    elif isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{_name(key)}" if path else _name(key)
            _check_string(key, where, is_key=True)
            _check(item, where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")


def _check_string(text: str, path: str, is_key: bool = False) -> None:
    where = f"{path}: the {'key' if is_key else 'string'}" if path else "the body is a string that"
    if "\x00" in text:
        raise InvalidRequest(f"{where} contains a NUL character (\\u0000), which is not accepted")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest(f"{where} contains a lone surrogate (\\u{ord(text[exc.start]):04x}), which is not "
                                 "a character; pair it or remove it") from None


def _name(key: str) -> str:
    """A key as it appears in a path: plain when it is a plain name, else quoted and cut short."""
    return key if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", key) else _quote(key)


def _quote(key: str) -> str:
    return repr(key[:64] + ("..." if len(key) > 64 else ""))
