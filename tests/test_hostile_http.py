"""Hostile request *structure*: JSON nesting, value counts, numbers, duplicate keys and encodings;
HTTP framing (lying Content-Length, cut-off chunked bodies, bad headers); multipart boundaries,
part counts, part headers, nesting. Every case must get a 4xx in our JSON error shape whose
message names the problem, never a 5xx, and the router keeps serving.

Two seams. What the app decides (the JSON and multipart tables, the hypothesis-generated
structures, values, byte mutations and multipart bodies) runs in-process against the real app
around a backend without workers (tests/edge_app.py): a request in milliseconds. What the server
decides under the app (framing, header limits, body deadlines: router/edge/http_limits.py) runs over
the wire against a real router process without workers, with a few rows of each table sent that
way too. Either way a valid request ends in a quick 503 naming the stage, which shows it passed
validation.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from common.sizes import ImageSize
from harness.local_cluster import Cluster, write_stage_config
from router.core.errors import ServiceError
from router.core.image_request import ImageBackend, ImageRequest
from router.server import build_core
from tests.edge_app import MODEL_NAME, InProcessEdge, NoWorkersBackend, edge_stage_config, in_process_edge
from tests.raw_http import exchange, request_head

pytestmark = pytest.mark.quick

GEN, EDIT, CHAT = "/v1/images/generations", "/v1/images/edits", "/v1/chat/completions"
BODY_TIMEOUT_S = 2.0
JSON = {"content-type": "application/json"}
OK = {"prompt": "a cat", "size": "256x256", "num_inference_steps": 1}
NO_WORKER = "no live ar worker"  # the 503 of a request that passed validation


@pytest.fixture(scope="module")
def edge():
    """The router's app in-process, without workers (tests/edge_app.py)."""
    with in_process_edge() as app:
        yield app


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    """A router alone (no workers), with a short body deadline so the framing cases stay fast."""
    workdir = tmp_path_factory.mktemp("hostile")
    config = write_stage_config(workdir, {"router": {"no_worker_grace_s": 0, "http_body_timeout_s": BODY_TIMEOUT_S,
                                                     "http_header_timeout_s": 5}})
    with Cluster(model=workdir / "no-model", workdir=workdir, stage_config=config, num_ar=0, num_dit=0) as cluster:
        yield cluster


def post(target: InProcessEdge | Cluster, path: str, content: bytes, headers: dict | None = None) -> httpx.Response:
    """POST to the in-process edge, or over the wire (a fresh connection) to a router process."""
    headers = JSON if headers is None else headers
    if isinstance(target, InProcessEdge):
        return target.client.post(path, content=content, headers=headers)
    return httpx.post(target.url + path, content=content, headers=headers, timeout=30)


def assert_refused(response: httpx.Response, status: int, *keywords: str) -> None:
    """`status` in our error shape, its message naming every keyword (case-insensitively)."""
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert error["code"] == status and error["type"] == "invalid_request_error"
    for keyword in keywords:
        assert keyword.lower() in error["message"].lower(), error["message"]


def assert_passed_validation(response: httpx.Response) -> None:
    """The 503 of a router without workers: the request was valid and only the workers are missing."""
    assert response.status_code == 503 and NO_WORKER in response.json()["error"]["message"], response.text[:300]


# ---------------------------------------------------------------------------
# JSON structure


@dataclass
class JsonCase:
    id: str
    body: bytes
    status: int
    keywords: tuple[str, ...]
    path: str = GEN
    headers: dict = field(default_factory=lambda: dict(JSON))


def body(**fields: object) -> bytes:
    return json.dumps({**OK, **fields}).encode()


def with_raw(name: str, raw: bytes) -> bytes:
    """OK's body with field `name` set to the raw JSON text `raw` (for what json.dumps cannot write)."""
    return b'{"prompt": "a cat", "size": "256x256", "' + name.encode() + b'": ' + raw + b"}"


TEXT = '{"prompt": "a cat", "size": "256x256"}'
JSON_CASES = [
    # nesting: the C parser would recurse until RecursionError
    JsonCase("100k nested arrays", b"[" * 100_000, 400, ("more than 32 levels deep",)),
    JsonCase("100k nested objects", b'{"a":' * 100_000, 400, ("more than 32 levels deep",)),
    JsonCase("deep value in a field", with_raw("user", b"[" * 40 + b"]" * 40), 400, ("levels deep",)),
    JsonCase("deep chat content", b'{"messages": [{"role": "user", "content": ' + b"[" * 60 + b"]" * 60 + b"}]}",
             400, ("levels deep",), path=CHAT),
    # value counts: [{},{},...] is GBs of Python objects from a 100 MB body
    JsonCase("1M-element array", b"[" + b"0," * 999_999 + b"0]", 400, ("1000000 values", "at most 10000")),
    JsonCase("1M empty objects", b"[" + b"{}," * 999_999 + b"{}]", 400, ("values",)),
    JsonCase("object with 100k keys", b"{" + b",".join(b'"k%d":0' % i for i in range(100_000)) + b"}", 400, ("values",)),
    JsonCase("100k values in a field", with_raw("user", b"[" + b"1," * 100_000 + b"1]"), 400, ("values",)),
    # numbers
    JsonCase("exponent 1e999999", with_raw("guidance_scale", b"1e999999"), 400, ("guidance_scale", "finite")),
    JsonCase("exponent -1e999999", with_raw("guidance_scale", b"-1e999999"), 400, ("guidance_scale", "finite")),
    JsonCase("100k-digit integer", with_raw("seed", b"9" * 100_000), 400, ("seed", "too long")),
    JsonCase("4301-digit integer", with_raw("seed", b"1" * 4301), 400, ("seed", "too long")),
    JsonCase("long fraction", with_raw("guidance_scale", b"1." + b"5" * 5000), 400, ("guidance_scale", "too long")),
    JsonCase("-0 where n >= 1", with_raw("n", b"-0"), 400, ("n",)),
    JsonCase("NaN literal", with_raw("guidance_scale", b"NaN"), 400, ("guidance_scale", "NaN is not valid JSON")),
    JsonCase("Infinity literal", with_raw("guidance_scale", b"Infinity"), 400, ("guidance_scale", "Infinity")),
    JsonCase("-Infinity literal", with_raw("seed", b"-Infinity"), 400, ("seed", "-Infinity")),
    JsonCase("NaN deep in chat", b'{"messages": [{"role": "user", "content": "a"}], "temperature": NaN}', 400,
             ("temperature", "NaN"), path=CHAT),
    # duplicate keys: which one counts is ambiguous (and differs between parsers)
    JsonCase("duplicate top-level key", b'{"prompt": "a cat", "prompt": "a dog"}', 400, ("'prompt'", "more than once")),
    JsonCase("duplicate key in a message", b'{"messages": [{"role": "user", "role": "system", "content": "a"}]}', 400,
             ("messages[0]", "'role'", "duplicate"), path=CHAT),
    # encodings: JSON travels as UTF-8 (RFC 8259)
    JsonCase("UTF-8 with BOM", b"\xef\xbb\xbf" + TEXT.encode(), 400, ("byte order mark", "UTF-8")),
    JsonCase("UTF-16 LE with BOM", TEXT.encode("utf-16"), 400, ("UTF-16", "must be UTF-8")),
    JsonCase("UTF-16 BE with BOM", b"\xfe\xff" + TEXT.encode("utf-16-be"), 400, ("UTF-16 (big-endian",)),
    JsonCase("UTF-16 LE without BOM", TEXT.encode("utf-16-le"), 400, ("UTF-16 (little-endian)",)),
    JsonCase("UTF-16 BE without BOM", TEXT.encode("utf-16-be"), 400, ("UTF-16 (big-endian)",)),
    JsonCase("UTF-32 LE with BOM", TEXT.encode("utf-32"), 400, ("UTF-32",)),
    JsonCase("UTF-32 BE without BOM", TEXT.encode("utf-32-be"), 400, ("UTF-32 (big-endian)",)),
    JsonCase("UTF-32 LE without BOM", TEXT.encode("utf-32-le"), 400, ("UTF-32 (little-endian)",)),
    JsonCase("invalid byte 0xff", b'{"prompt": "a \xff cat"}', 400, ("not valid UTF-8",)),
    JsonCase("overlong '/' (C0 AF)", b'{"prompt": "a \xc0\xaf cat"}', 400, ("not valid UTF-8",)),
    JsonCase("overlong NUL (C0 80)", b'{"prompt": "a \xc0\x80 cat"}', 400, ("not valid UTF-8",)),
    JsonCase("overlong 3-byte (E0 80 AF)", b'{"prompt": "a \xe0\x80\xaf cat"}', 400, ("not valid UTF-8",)),
    JsonCase("UTF-8 encoded surrogate (ED A0 80)", b'{"prompt": "a \xed\xa0\x80 cat"}', 400, ("not valid UTF-8",)),
    JsonCase("beyond U+10FFFF (F4 90 80 80)", b'{"prompt": "a \xf4\x90\x80\x80 cat"}', 400, ("not valid UTF-8",)),
    JsonCase("5-byte sequence", b'{"prompt": "a \xf8\x88\x80\x80\x80 cat"}', 400, ("not valid UTF-8",)),
    JsonCase("truncated sequence at the end", b'{"prompt": "a cat \xe2\x82', 400, ("not valid UTF-8",)),
    JsonCase("Latin-1 text", '{"prompt": "café"}'.encode("latin-1"), 400, ("not valid UTF-8",)),
    JsonCase("lone high surrogate", b'{"prompt": "a \\ud800 cat"}', 400, ("prompt", "lone surrogate", "\\ud800")),
    JsonCase("lone low surrogate", b'{"prompt": "a \\udc00 cat"}', 400, ("prompt", "lone surrogate")),
    JsonCase("surrogates reversed", b'{"prompt": "a \\ude00\\ud83d cat"}', 400, ("prompt", "lone surrogate")),
    JsonCase("surrogate in a key", b'{"prompt": "a cat", "\\ud800": 1}', 400, ("key", "lone surrogate")),
    JsonCase("surrogate deep in chat", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": '
             b'"\\udbff"}]}]}', 400, ("messages[0].content[0].text", "surrogate"), path=CHAT),
    JsonCase("escaped NUL in the prompt", b'{"prompt": "a \\u0000 cat"}', 400, ("prompt", "NUL")),
    JsonCase("raw NUL in a string", b'{"prompt": "a \x00 cat"}', 400, ("not valid JSON", "control character")),
    JsonCase("NUL after the value", TEXT.encode() + b"\x00", 400, ("not valid JSON", "extra data")),
    # not JSON, or not an object
    JsonCase("whitespace only", b" \r\n\t ", 400, ("not valid JSON",)),
    JsonCase("trailing garbage", TEXT.encode() + b" x", 400, ("not valid JSON",)),
    JsonCase("trailing comma", b'{"prompt": "a cat",}', 400, ("not valid JSON",)),
    JsonCase("single quotes", b"{'prompt': 'a cat'}", 400, ("not valid JSON",)),
    JsonCase("comment", b'{"prompt": "a cat" /* hi */}', 400, ("not valid JSON",)),
    JsonCase("unterminated string", b'{"prompt": "a cat', 400, ("not valid JSON",)),
    JsonCase("top-level 1 MB string", b'"' + b"a" * 1_000_000 + b'"', 400, ("JSON object",)),
    JsonCase("top-level number", b"42", 400, ("JSON object",)),
    JsonCase("top-level null", b"null", 400, ("JSON object",)),
    # content types
    JsonCase("charset=utf-16", TEXT.encode("utf-16"), 415, ("UTF-8", "charset=utf-16"),
             headers={"content-type": "application/json; charset=utf-16"}),
    JsonCase("charset=latin-1", TEXT.encode(), 415, ("UTF-8",), headers={"content-type": "application/json; charset=latin-1"}),
    JsonCase("text/plain", TEXT.encode(), 415, ("application/json",), headers={"content-type": "text/plain"}),
    JsonCase("application/xml", b"<prompt>a cat</prompt>", 415, ("application/json",),
             headers={"content-type": "application/xml"}),
    JsonCase("urlencoded form", b"prompt=a+cat", 415, ("application/json",),
             headers={"content-type": "application/x-www-form-urlencoded"}),
    JsonCase("multipart to a JSON endpoint", b"--a\r\n\r\n--a--\r\n", 415, ("application/json",),
             headers={"content-type": "multipart/form-data; boundary=a"}),
    JsonCase("1 KB content type", TEXT.encode(), 415, ("application/json",), headers={"content-type": "x/" + "y" * 1000}),
]


# ---------------------------------------------------------------------------
# multipart structure


def part(name: str | None, data: bytes, filename: str | None = None, headers: str = "") -> bytes:
    disposition = "form-data" + (f'; name="{name}"' if name is not None else "")
    disposition += f'; filename="{filename}"' if filename is not None else ""
    return f"--b0undary\r\nContent-Disposition: {disposition}\r\n{headers}\r\n".encode() + data + b"\r\n"


END = b"--b0undary--\r\n"
PROMPT = part("prompt", b"a cat")
IMAGE = part("image", b"\x89PNG not really", filename="a.png", headers="Content-Type: image/png\r\n")
FORM = {"content-type": "multipart/form-data; boundary=b0undary"}

MULTIPART_CASES = [
    ("no boundary parameter", PROMPT + END, {"content-type": "multipart/form-data"}, ("boundary",)),
    ("empty boundary", PROMPT + END, {"content-type": "multipart/form-data; boundary="}, ("boundary",)),
    ("1000-char boundary", PROMPT + END, {"content-type": "multipart/form-data; boundary=" + "a" * 1000},
     ("boundary", "70")),
    ("boundary with a backslash", PROMPT + END, {"content-type": 'multipart/form-data; boundary="a\\\\b"'},
     ("boundary",)),
    ("body without the closing delimiter", PROMPT + IMAGE, FORM, ("closing delimiter", "truncated")),
    ("body cut in a part", (PROMPT + IMAGE)[:-8], FORM, ("truncated",)),
    ("empty body", b"", FORM, ("truncated",)),
    ("not multipart at all", b"hello world", FORM, ("could not be parsed",)),
    ("5000 text parts", b"".join(part(f"f{i}", b"x") for i in range(5000)) + END, FORM, ("too many fields",)),
    ("3000 file parts", b"".join(part("image", b"x", filename=f"{i}.png") for i in range(3000)) + END, FORM,
     ("too many files",)),
    ("100 KB part header", part("prompt", b"a cat", headers="X-Big: " + "a" * 100_000 + "\r\n") + END, FORM,
     ("header",)),
    ("50 headers in one part", part("prompt", b"a", headers="".join(f"X-{i}: v\r\n" for i in range(50))) + END, FORM,
     ("header",)),
    ("part header without a colon", b"--b0undary\r\nnonsense header\r\n\r\nx\r\n" + END, FORM, ("could not be parsed",)),
    ("nested multipart part", part("prompt", b"--inner\r\n\r\nx\r\n--inner--",
                                   headers="Content-Type: multipart/mixed; boundary=inner\r\n") + IMAGE + END, FORM,
     ("nested multipart",)),
    ("part without a name", part(None, b"a cat") + END, FORM, ('"name" must be provided',)),
    ("part without Content-Disposition", b"--b0undary\r\nContent-Type: text/plain\r\n\r\nx\r\n" + END, FORM,
     ('"name" must be provided',)),
    ("prompt sent as a file", part("prompt", b"a cat", filename="p.txt") + IMAGE + END, FORM,
     ("unexpected file field 'prompt'",)),
    ("image sent as text", PROMPT + part("image", b"not a file") + END, FORM, ("must be a file upload",)),
    ("field given twice", PROMPT + PROMPT + IMAGE + END, FORM, ("more than once",)),
    ("NUL in a field", part("prompt", b"a \x00 cat") + IMAGE + END, FORM, ("NUL",)),
    ("1 MB text field", part("prompt", b"x" * 1_000_000) + IMAGE + END, FORM, ("maximum size",)),
    ("image bytes that are no image", PROMPT + IMAGE + END, FORM, ("not a PNG, JPEG or WebP",)),
    ("multipart/mixed", PROMPT + END, {"content-type": "multipart/mixed; boundary=b0undary"}, ("multipart/form-data",)),
    ("JSON to the multipart endpoint", b'{"prompt": "a cat"}', JSON, ("multipart/form-data",)),
]


# ---------------------------------------------------------------------------
# In-process: the tables (tests/edge_app.py; the app's own decisions, a request in milliseconds)


def test_the_seam_tells_valid_from_hostile(edge):
    """The in-process app really validates: a valid body reaches the backend (the 503 of a router
    without workers, Retry-After included), a hostile one never does."""
    reached = len(edge.backend.requests)
    response = post(edge, GEN, body(prompt="a seam"))
    assert_passed_validation(response)
    assert response.headers["retry-after"] == "5"
    assert [r.prompt for r in edge.backend.requests[reached:]] == ["a seam"]
    with pytest.raises(AssertionError):  # the check the tables use cannot take a valid request for a refusal
        assert_refused(response, 503)
    assert_refused(post(edge, GEN, b"[" * 100), 400, "levels deep")
    assert len(edge.backend.requests) == reached + 1


@pytest.mark.parametrize("case", JSON_CASES, ids=[c.id for c in JSON_CASES])
def test_hostile_json_is_refused_with_a_clear_4xx(edge, case: JsonCase):
    reached = len(edge.backend.requests)
    start = time.monotonic()
    response = post(edge, case.path, case.body, case.headers)
    assert_refused(response, case.status, *case.keywords)
    assert time.monotonic() - start < 5, "refusing a hostile body must be cheap"
    assert len(edge.backend.requests) == reached, "a refused body must never reach the backend"


def test_valid_json_without_content_type_passes_validation(edge):
    """A missing Content-Type is read as JSON (curl --data-binary): the request is valid, and only
    the missing workers stop it."""
    assert_passed_validation(post(edge, GEN, json.dumps(OK).encode(), headers={}))


def test_legitimate_edges_pass(edge):
    """What the limits must not refuse: -0 (a number), a surrogate pair, brackets inside strings,
    32 levels, a big string."""
    for ok in (with_raw("seed", b"-0"), b'{"prompt": "a cat \\ud83d\\ude00", "size": "256x256"}',
               with_raw("user", json.dumps("[{" * 100_000).encode()),
               with_raw("user", b'"' + b"A" * 5_000_000 + b'"')[:-1] + b', "num_inference_steps": 1}'):
        # `user` is an OpenAI field we accept; the request reaches the (missing) workers.
        assert_passed_validation(post(edge, GEN, ok))
    assert edge.backend.requests[-3].prompt == "a cat \U0001F600"  # the pair, joined into one character
    nested = b'{"messages": [{"role": "user", "content": "a cat"}], "extra_body": {"x": ' + b"[" * 28 + b"]" * 28 + b"}}"
    response = post(edge, CHAT, nested)
    assert "levels deep" not in response.text, response.text[:300]


@pytest.mark.parametrize("case", MULTIPART_CASES, ids=[c[0] for c in MULTIPART_CASES])
def test_hostile_multipart_is_refused_with_a_clear_4xx(edge, case):
    _, content, headers, keywords = case
    reached = len(edge.backend.requests)
    response = post(edge, EDIT, content, headers)
    assert 400 <= response.status_code < 500, response.text[:500]
    assert_refused(response, response.status_code, *keywords)
    assert len(edge.backend.requests) == reached, "a refused body must never reach the backend"


# ---------------------------------------------------------------------------
# In-process: generated structures (hypothesis), then checks of the seam itself

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=40)


def assert_answered_without_failing(response: httpx.Response) -> None:
    assert response.status_code < 500 or (response.status_code == 503 and NO_WORKER in response.text), response.text[:300]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["code"] == response.status_code


@FUZZ
@given(levels=st.lists(st.sampled_from([b"[", b'{"k": ']), min_size=1, max_size=120), inner=st.sampled_from([b"1", b'"x"', b"[]"]))
def test_generated_nesting(edge, levels, inner):
    closing = b"".join(b"]" if level == b"[" else b"}" for level in reversed(levels))
    response = post(edge, GEN, b"".join(levels) + inner + closing)
    if len(levels) > 32:
        assert_refused(response, 400, "more than 32 levels deep")
    else:
        assert_refused(response, 400, "JSON object" if levels[0] == b"[" else "unknown field 'k'")


@FUZZ
@given(extra=st.dictionaries(st.text(max_size=10), json_values, max_size=4), prompt=json_values)
def test_generated_values(edge, extra, prompt):
    """Any JSON values, NaN and infinities included (json.dumps writes them as literals)."""
    response = post(edge, GEN, json.dumps({"prompt": prompt, **extra, "size": "256x256"}).encode())
    assert_answered_without_failing(response)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 2), st.binary(min_size=1, max_size=3)), max_size=6))
def test_mutated_json_bytes(edge, edits):
    """A valid body with bytes replaced, inserted or deleted here and there."""
    data = bytearray(json.dumps({**OK, "messages": [{"role": "user", "content": "é ✓ 😀"}]}).encode())
    for position, kind, chunk in edits:
        position %= len(data) + 1
        if kind == 0:
            data[position:position + len(chunk)] = chunk
        elif kind == 1:
            data[position:position] = chunk
        else:
            del data[position:position + len(chunk)]
    for path in (GEN, CHAT):
        assert_answered_without_failing(post(edge, path, bytes(data)))


part_strategy = st.tuples(
    st.one_of(st.none(), st.sampled_from(["prompt", "image", "image[]", "n", "size", "mask", ""]), st.text(max_size=8)),
    st.one_of(st.none(), st.text(max_size=8)),  # filename
    st.sampled_from(["", "Content-Type: image/png\r\n", "Content-Type: multipart/mixed; boundary=x\r\n",
                     "Content-Type: text/plain; charset=utf-16\r\n", "Content-Transfer-Encoding: base64\r\n"]),
    st.binary(max_size=64))


@FUZZ
@given(parts=st.lists(part_strategy, max_size=12), closed=st.booleans(),
       boundary=st.sampled_from(["b0undary", "x", "a" * 70, "a" * 71, "with space", "quote\"d", ""]))
def test_generated_multipart(edge, parts, closed, boundary):
    pieces = []
    for name, filename, headers, data in parts:
        disposition = "form-data" + (f'; name="{name}"' if name is not None else "")
        disposition += f'; filename="{filename}"' if filename is not None else ""
        pieces.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{headers}\r\n".encode("utf-8", "surrogatepass")
                      + data + b"\r\n")
    content = b"".join(pieces) + (f"--{boundary}--\r\n".encode() if closed else b"")
    response = post(edge, EDIT, content, {"content-type": f"multipart/form-data; boundary={boundary}"})
    assert_answered_without_failing(response)


def test_the_fake_backend_refuses_as_the_orchestrator_does():
    """tests/edge_app.py's NoWorkersBackend against the real Orchestrator with no worker registered
    (its bus never started): the same events, the same error, the same answers, so a 503 from the
    in-process app means what it means from a router process."""
    config = edge_stage_config({"router": {"no_worker_grace_s": 0}})
    request = ImageRequest(request_id="r1", prompt="a cat", size=ImageSize(256, 256), n=2)

    async def outcome(backend: ImageBackend) -> tuple:
        events: list = []
        with pytest.raises(ServiceError) as refused:
            await backend.generate(request, events.append)
        error = refused.value
        return (type(error), error.status_code, error.message, error.retry_after_s, events,
                backend.live_workers(), backend.models(), backend.metrics_targets())

    async def both() -> tuple[tuple, tuple]:
        bus, orchestrator = build_core(config, MODEL_NAME, "tcp://127.0.0.1:0", CollectorRegistry())
        try:
            real = await outcome(orchestrator)
        finally:
            bus.ctx.term()
        return real, await outcome(NoWorkersBackend(config))

    real, fake = asyncio.run(both())
    assert fake == real
    assert NO_WORKER in fake[2] and len(fake[4]) == 2  # one "queued" event per image


def test_edge_still_serves_after_all_of_it(edge):
    """Runs after the in-process tests (pytest keeps file order): no 5xx but the 503 of a valid
    request, no error logged (an unhandled one is logged, then answered 500), and requests still served."""
    assert not {s for s in edge.statuses() if s.startswith("5") and s != "503"}, edge.statuses()
    assert not edge.logged_errors(), edge.logged_errors()[:5]
    assert edge.client.get("/health").status_code == 200
    assert_passed_validation(post(edge, GEN, json.dumps(OK).encode()))


# ---------------------------------------------------------------------------
# Over the wire: a few rows of the tables through a real router process (uvicorn, our protocol, a
# socket), one per way of refusing: a big body parsed off the event loop, schema validation, a 415
# before the body is read, a multipart parse stopped mid-body, an image refused by its decoder.

WIRE_JSON = ("1M-element array", "-0 where n >= 1", "charset=utf-16")
WIRE_MULTIPART = ("5000 text parts", "image bytes that are no image")


def rows_named(rows: list, ids: tuple[str, ...], id_of: Callable[[Any], str]) -> list:
    """The rows of a table whose id is in `ids`, in table order; a renamed row fails here, not silently."""
    chosen = [row for row in rows if id_of(row) in ids]
    assert sorted(map(id_of, chosen)) == sorted(ids), ids
    return chosen


@pytest.mark.slow  # over the wire: a router process
@pytest.mark.parametrize("case", rows_named(JSON_CASES, WIRE_JSON, lambda c: c.id), ids=lambda c: c.id)
def test_hostile_json_over_the_wire(router, case: JsonCase):
    start = time.monotonic()
    response = post(router, case.path, case.body, case.headers)
    assert_refused(response, case.status, *case.keywords)
    assert time.monotonic() - start < 5, "refusing a hostile body must be cheap"


@pytest.mark.slow  # over the wire: a router process
@pytest.mark.parametrize("case", rows_named(MULTIPART_CASES, WIRE_MULTIPART, lambda c: c[0]), ids=lambda c: c[0])
def test_hostile_multipart_over_the_wire(router, case):
    _, content, headers, keywords = case
    response = post(router, EDIT, content, headers)
    assert 400 <= response.status_code < 500, response.text[:500]
    assert_refused(response, response.status_code, *keywords)


# ---------------------------------------------------------------------------
# Over the wire: HTTP framing (raw sockets: no client would send these; the uvicorn protocol decides)


@pytest.mark.slow  # over the wire: a router process
def test_content_length_larger_than_sent_times_out_with_408(router):
    head = request_head("POST", GEN, {"Content-Type": "application/json", "Content-Length": "1000"})
    response = exchange(router.http_port, head + b'{"prompt": "a', check_closed=5)
    assert response.status == 408
    assert "request body not received in time" in response.error()["message"]
    assert BODY_TIMEOUT_S - 0.5 < response.seconds < BODY_TIMEOUT_S + 2
    assert response.closed


@pytest.mark.slow  # over the wire: a router process
def test_chunked_body_that_stalls_times_out_with_408(router):
    head = request_head("POST", GEN, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    response = exchange(router.http_port, head + b"5\r\n{\"pro\r\n", check_closed=5)
    assert response.status == 408 and response.closed


@pytest.mark.slow  # over the wire: a router process
@pytest.mark.parametrize("framing,expected", [
    ({"Content-Length": "1000"}, "before the 1000 bytes of its Content-Length"),
    ({"Transfer-Encoding": "chunked"}, "before its last chunk"),
])
def test_body_cut_off_by_the_client_is_a_400(router, framing, expected):
    head = request_head("POST", GEN, {"Content-Type": "application/json", **framing})
    sent = b"5\r\n{\"pro\r\n" if "Transfer-Encoding" in framing else b'{"prompt": "a'
    response = exchange(router.http_port, head + sent, half_close=True)
    assert response.status == 400 and expected in response.error()["message"]
    assert response.seconds < 2  # at once, not at the deadline


@pytest.mark.slow  # over the wire: a router process
@pytest.mark.parametrize("raw", [
    request_head("POST", GEN, {"Content-Length": "abc"}),
    request_head("POST", GEN, {"Content-Length": "-5"}),
    request_head("POST", GEN, {"Content-Length": "5", "Transfer-Encoding": "chunked"}) + b"0\r\n\r\n",
    request_head("POST", GEN, {"Content-Length": "5", "content-length": "6"}) + b"xxxxxx",
    request_head("POST", GEN, {"Transfer-Encoding": "chunked"}) + b"zz\r\nabc\r\n",
    request_head("POST", GEN, {"Transfer-Encoding": "chunked"}) + b"FFFFFFFFFFFFFFFFFF\r\nabc\r\n",
    request_head("GET", "/health", {"X-Nul": "a\x00b"}),
    b"GARBAGE\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS ClientHello on the plain port
], ids=["length not a number", "negative length", "length and chunked", "two lengths", "bad chunk size",
        "chunk size overflow", "NUL in a header", "not HTTP", "TLS hello"])
def test_malformed_http_is_a_json_400(router, raw):
    response = exchange(router.http_port, raw, check_closed=5)
    assert response.status == 400 and "malformed HTTP request" in response.error()["message"]
    assert response.closed


@pytest.mark.slow  # over the wire: a router process
def test_declared_body_over_the_limit_is_413_at_once(router):
    head = request_head("POST", GEN, {"Content-Type": "application/json", "Content-Length": str(10**12)})
    response = exchange(router.http_port, head, check_closed=5)  # nothing of the body is ever sent
    assert response.status == 413 and "at most" in response.error()["message"]
    assert response.seconds < 1 and response.closed


@pytest.mark.slow  # over the wire: a router process
def test_headers_over_32_kib_are_a_431(router):
    response = exchange(router.http_port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n",
                        check_closed=5)
    assert response.status == 431 and "request headers exceed 32768 bytes" in response.error()["message"]
    assert response.closed
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 20) for i in range(2000))
    response = exchange(router.http_port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert response.status == 431
    # Headers that never end: refused once 32 KiB are held, not at the header deadline.
    endless = b"GET /health HTTP/1.1\r\nX-Endless: " + b"a" * 200_000
    response = exchange(router.http_port, endless, check_closed=5)
    assert response.status == 431 and response.seconds < 2 and response.closed


@pytest.mark.slow  # over the wire: a router process
def test_router_still_serves_after_all_of_it(router):
    """Runs last (pytest keeps file order): no 5xx, nothing unhandled, and requests still served."""
    assert router.procs["router"].alive(), router.logs_tail()
    assert httpx.get(f"{router.url}/health", timeout=5).status_code == 200
    metrics = httpx.get(f"{router.url}/metrics", timeout=5).text
    statuses = {line.split('status="')[1].split('"')[0] for line in metrics.splitlines()
                if line.startswith("glm_router_http_requests_total")}
    assert not {s for s in statuses if s.startswith("5") and s != "503"}, statuses
    log = router.procs["router"].log()
    for bad in ("unhandled error", "Exception in ASGI application", "Traceback"):
        assert bad not in log, log[-3000:]
    response = post(router, GEN, json.dumps(OK).encode())
    assert response.status_code == 503 and NO_WORKER in response.text
