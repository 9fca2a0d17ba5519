"""Bad requests: every one is a 4xx whose message names the problem.

The table runs in-process against the real app with this module's limits (small uploads, so
oversized ones stay cheap) around a backend without workers (tests/edge_app.py): no row needs a
worker, and each is checked never to reach the backend. A few rows, one per way of refusing, go
over the wire to a real cluster (router + 1 AR + 1 DiT worker, the same limits); then a good
request must still succeed there and the router must still be healthy.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from PIL import Image

from common.stage_config import load_stage_config
from harness.local_cluster import TINY_STAGE_CONFIG, Cluster, generate
from tests.edge_app import InProcessEdge, in_process_edge
from tests.helpers import assert_router_unhurt, chat, cluster_with, data_url, image_part, noise_png, png, png_claiming, response_image

pytestmark = pytest.mark.quick

MAX_UPLOAD = 256 * 1024  # bytes per condition image on this cluster
LIMITS = load_stage_config(TINY_STAGE_CONFIG).limits  # the cluster's other limits
GEN, EDIT, CHAT = "/v1/images/generations", "/v1/images/edits", "/v1/chat/completions"


def multipart(fields: dict[str, str], boundary: str = "glmtestboundary") -> tuple[bytes, dict]:
    """A multipart/form-data body with text fields only (httpx would send those urlencoded)."""
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()]
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def real_bomb() -> bytes:
    """A real decompression bomb: 5000x5000 black pixels (25 Mpx > the 16.7 Mpx limit) in a few KB."""
    out = io.BytesIO()
    Image.new("1", (5000, 5000)).save(out, format="PNG", optimize=True)
    return out.getvalue()


@dataclass
class Case:
    id: str
    path: str
    status: int
    keyword: str  # must appear (case-insensitively) in the error message
    method: str = "POST"
    json: object = None
    content: bytes | None = None
    headers: dict = field(default_factory=dict)
    files: list | None = None
    data: dict | None = None


OK = {"prompt": "a cat", "size": "256x256", "num_inference_steps": 1}
FORM = {"prompt": "a cat", "size": "256x256"}
IMG = ("image", ("a.png", png(), "image/png"))

CASES = [
    # --- JSON body, /v1/images/generations ---------------------------------------------------
    Case("malformed json", GEN, 400, "not valid JSON", content=b'{"prompt": "x",', headers={"content-type": "application/json"}),
    Case("empty body", GEN, 400, "empty", content=b"", headers={"content-type": "application/json"}),
    Case("json array body", GEN, 400, "JSON object", json=[OK]),
    Case("json string body", GEN, 400, "JSON object", json="a cat"),
    Case("invalid utf-8", GEN, 400, "not valid JSON", content=b'{"prompt": "\xff\xfe"}', headers={"content-type": "application/json"}),
    Case("text/plain content type", GEN, 415, "application/json", content=b"a cat", headers={"content-type": "text/plain"}),
    Case("form content type", GEN, 415, "application/json", data={"prompt": "a cat"}),
    Case("missing prompt", GEN, 400, "'prompt' is required", json={"size": "256x256"}),
    Case("prompt of wrong type", GEN, 400, "prompt", json={**OK, "prompt": 123}),
    Case("prompt is null", GEN, 400, "prompt", json={**OK, "prompt": None}),
    Case("empty prompt", GEN, 400, "must not be empty", json={**OK, "prompt": ""}),
    Case("blank prompt", GEN, 400, "must not be empty", json={**OK, "prompt": "  \n\t "}),
    Case("huge prompt", GEN, 400, "too long", json={**OK, "prompt": "x" * (LIMITS.max_prompt_chars + 1)}),
    Case("unknown field", GEN, 400, "unknown field 'num_inference_step'", json={**OK, "num_inference_step": 2}),
    Case("size not WxH", GEN, 400, "size", json={**OK, "size": "banana"}),
    Case("size of wrong type", GEN, 400, "size", json={**OK, "size": 512}),
    Case("size below minimum", GEN, 400, str(LIMITS.min_side), json={**OK, "size": "128x128"}),
    Case("size above maximum", GEN, 400, str(LIMITS.max_side), json={**OK, "size": f"{2 * LIMITS.max_side}x{2 * LIMITS.max_side}"}),
    Case("size not multiple of 32", GEN, 400, "32", json={**OK, "size": "1000x1000"}),
    Case("aspect ratio too wide", GEN, 400, "aspect", json={**OK, "size": "2048x256"}),
    Case("negative size", GEN, 400, "size", json={**OK, "size": "-256x256"}),
    Case("n zero", GEN, 400, "n", json={**OK, "n": 0}),
    Case("n over limit", GEN, 400, f"limit of {LIMITS.max_n}", json={**OK, "n": LIMITS.max_n + 1}),
    Case("n not a number", GEN, 400, "n", json={**OK, "n": "two"}),
    Case("n fractional", GEN, 400, "n", json={**OK, "n": 1.5}),
    Case("steps zero", GEN, 400, "num_inference_steps", json={**OK, "num_inference_steps": 0}),
    Case("steps over limit", GEN, 400, "num_inference_steps", json={**OK, "num_inference_steps": 100000}),
    Case("guidance negative", GEN, 400, "guidance_scale", json={**OK, "guidance_scale": -1}),
    Case("guidance over limit", GEN, 400, "guidance_scale", json={**OK, "guidance_scale": 1e6}),
    Case("guidance NaN", GEN, 400, "guidance_scale", content=b'{"prompt": "a", "size": "256x256", "guidance_scale": NaN}',
         headers={"content-type": "application/json"}),
    Case("seed negative", GEN, 400, "seed", json={**OK, "seed": -1}),
    Case("seed beyond 64 bits", GEN, 400, "seed", json={**OK, "seed": 2**64}),
    Case("unknown model", GEN, 404, "model", json={**OK, "model": "dall-e-3"}),
    Case("url response format", GEN, 400, "b64_json", json={**OK, "response_format": "url"}),
    Case("unknown output format", GEN, 400, "output_format", json={**OK, "output_format": "gif"}),
    Case("oversized json body", GEN, 413, "bytes", json={**OK, "user": "x" * (2 * 1024 * 1024)}),
    Case("transparent background", GEN, 400, "cannot draw transparent backgrounds", json={**OK, "background": "transparent"}),
    Case("too many partial images", GEN, 400, "partial_images", json={**OK, "stream": True, "partial_images": 4}),
    Case("unknown quality", GEN, 400, "quality", json={**OK, "quality": "ultra"}),
    Case("output compression over 100", GEN, 400, "output_compression", json={**OK, "output_compression": 101}),
    Case("streamed bad size", GEN, 400, "nearest valid size is 992x992", json={**OK, "size": "1000x1000", "stream": True}),
    # --- multipart, /v1/images/edits -------------------------------------------------------------
    Case("edits with json", EDIT, 415, "multipart/form-data", json=OK),
    Case("edits without image", EDIT, 400, "'image' is required", content=multipart(FORM)[0], headers=multipart(FORM)[1]),
    Case("edits unexpected file field", EDIT, 400, "unexpected file field", data=FORM, files=[IMG, ("photo", ("p.png", png(), "image/png"))]),
    Case("edits image as text", EDIT, 400, "file upload", data={**FORM, "image": "not a file"}, files=[("x", ("x", b"", "a/b"))]),
    Case("edits non-image bytes", EDIT, 400, "not a PNG, JPEG or WebP", data=FORM,
         files=[("image", ("a.png", b"hello, I am not an image", "image/png"))]),
    Case("edits empty image", EDIT, 400, "empty", data=FORM, files=[("image", ("a.png", b"", "image/png"))]),
    Case("edits truncated png", EDIT, 400, "truncated", data=FORM,
         files=[("image", ("a.png", noise_png(128, 128)[:20000], "image/png"))]),
    Case("edits bomb header", EDIT, 400, "pixels", data=FORM, files=[("image", ("bomb.png", png_claiming(100000, 100000), "image/png"))]),
    Case("edits real bomb", EDIT, 400, "pixels", data=FORM, files=[("image", ("bomb.png", real_bomb(), "image/png"))]),
    Case("edits oversized upload", EDIT, 413, "bytes", data=FORM,
         files=[("image", ("big.png", noise_png(320, 320), "image/png"))]),  # ~300 KB > 256 KiB
    Case("edits too many images", EDIT, 400, f"at most {LIMITS.max_condition_images}", data=FORM,
         files=[IMG] * (LIMITS.max_condition_images + 1)),
    Case("edits with mask", EDIT, 400, "mask", data=FORM, files=[IMG, ("mask", ("m.png", png(), "image/png"))]),
    Case("edits missing prompt", EDIT, 400, "'prompt' is required", data={"size": "256x256"}, files=[IMG]),
    Case("edits unknown field", EDIT, 400, "unknown field 'strength'", data={**FORM, "strength": "0.5"}, files=[IMG]),
    Case("edits bad size", EDIT, 400, "32", data={**FORM, "size": "300x300"}, files=[IMG]),
    Case("edits n out of range", EDIT, 400, "n", data={**FORM, "n": "99"}, files=[IMG]),
    Case("edits unknown model", EDIT, 404, "model", data={**FORM, "model": "gpt-image-1"}, files=[IMG]),
    Case("edits multipart without boundary", EDIT, 400, "boundary", content=b"--xyz\r\nnonsense",
         headers={"content-type": "multipart/form-data"}),
    # --- /v1/chat/completions ------------------------------------------------------------------
    Case("chat without messages", CHAT, 400, "'messages' is required", json={"size": "256x256"}),
    Case("chat with empty messages", CHAT, 400, "messages", json={"messages": []}),
    Case("chat without user text", CHAT, 400, "no text", json={"messages": [{"role": "system", "content": "be nice"}]}),
    Case("chat unknown role", CHAT, 400, "role", json={"messages": [{"role": "wizard", "content": "a cat"}]}),
    Case("chat temperature out of range", CHAT, 400, "temperature", json=chat("a cat", temperature=-1)),
    Case("chat height without width", CHAT, 400, "height", json=chat("a cat", height=256)),
    Case("chat remote image url", CHAT, 400, "data URL", json=chat([{"type": "text", "text": "a cat"}, image_part("http://example.com/cat.png")])),
    Case("chat bad base64", CHAT, 400, "base64", json=chat([{"type": "text", "text": "a cat"}, image_part("data:image/png;base64,@@@notbase64@@@")])),
    Case("chat non-image data url", CHAT, 400, "media type", json=chat([{"type": "text", "text": "a"}, image_part(data_url(b"hi", "text/plain"))])),
    Case("chat non-image bytes", CHAT, 400, "not a PNG, JPEG or WebP", json=chat([{"type": "text", "text": "a"}, image_part(data_url(b"GIF89a..."))])),
    Case("chat too many images", CHAT, 400, f"at most {LIMITS.max_condition_images}",
         json=chat([{"type": "text", "text": "a"}] + [image_part(data_url(png()))] * (LIMITS.max_condition_images + 1))),
    Case("chat extra_body conflict", CHAT, 400, "both", json=chat("a cat", n=1, extra_body={"n": 2})),
    Case("chat unknown model", CHAT, 404, "model", json=chat("a cat", model="glm-4")),
    # --- routing ------------------------------------------------------------------------------
    Case("wrong method", GEN, 405, "not allowed", method="GET"),
    Case("unknown endpoint", "/v1/images/variations", 404, "no such endpoint", json=OK),
]


SMALL_LIMITS = {"limits": {"max_upload_bytes": MAX_UPLOAD}}
# Over the wire too, one row per way of refusing: a body over the limit (413 from its Content-Length),
# an upload over the limit, a decompression bomb in the image decoder, validation on the streaming
# path, and routing.
WIRE = ("oversized json body", "edits oversized upload", "edits real bomb", "streamed bad size", "wrong method")
WIRE_CASES = [case for case in CASES if case.id in WIRE]
assert len(WIRE_CASES) == len(WIRE), "a row named in WIRE is missing from CASES"


@pytest.fixture(scope="module")
def edge():
    """The router's app in-process with this module's limits, without workers."""
    with in_process_edge(SMALL_LIMITS) as app:
        yield app


@pytest.fixture(scope="module")
def small_limits(tiny_model, tmp_path_factory):
    with cluster_with(tiny_model, tmp_path_factory, "bad_input", SMALL_LIMITS) as c:
        yield c


def send(target: InProcessEdge | Cluster, case: Case) -> httpx.Response:
    """Send `case` to the in-process edge, or over the wire to a cluster."""
    kwargs: dict[str, Any] = {"headers": case.headers}
    if case.json is not None:
        kwargs["content"] = json.dumps(case.json).encode()
        kwargs["headers"] = {"content-type": "application/json", **case.headers}
    if case.content is not None:
        kwargs["content"] = case.content
    if case.files is not None or case.data is not None:
        kwargs["files"], kwargs["data"] = case.files, case.data
    if isinstance(target, InProcessEdge):
        return target.client.request(case.method, case.path, **kwargs)
    return httpx.request(case.method, target.url + case.path, timeout=30, **kwargs)


def assert_4xx_naming_the_problem(response: httpx.Response, case: Case) -> None:
    assert response.status_code == case.status, response.text[:500]
    error = response.json()["error"]
    assert error["code"] == case.status
    assert case.keyword.lower() in error["message"].lower(), error["message"]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_is_a_4xx_naming_the_problem(edge, case: Case):
    reached = len(edge.backend.requests)
    assert_4xx_naming_the_problem(send(edge, case), case)
    assert len(edge.backend.requests) == reached, "a bad request must never reach the backend"


def test_the_edge_still_serves_after_the_table(edge):
    """Runs after the in-process table: no 5xx, nothing logged as an error, and a good request
    passes validation (the 503 of no workers; the seam is not refusing everything)."""
    assert not {s for s in edge.statuses() if s.startswith("5")}, edge.statuses()
    assert not edge.logged_errors(), edge.logged_errors()[:5]
    response = edge.client.post(GEN, json=OK)
    assert response.status_code == 503 and "no live ar worker" in response.json()["error"]["message"], response.text
    assert edge.backend.requests[-1].prompt == OK["prompt"]


@pytest.mark.slow  # over the wire: a cluster
@pytest.mark.parametrize("case", WIRE_CASES, ids=[c.id for c in WIRE_CASES])
def test_bad_request_over_the_wire(small_limits, case: Case):
    assert_4xx_naming_the_problem(send(small_limits, case), case)


@pytest.mark.slow
def test_still_healthy_after_the_table(small_limits):
    """Runs after the table (pytest keeps file order): nothing above hurt the server."""
    assert_router_unhurt(small_limits)
    response = generate(small_limits.url, seed=3)
    assert response.status_code == 200, response.text[:500]
    assert response_image(response).size == (256, 256)
    assert_router_unhurt(small_limits)
