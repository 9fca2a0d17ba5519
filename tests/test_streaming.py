"""Streaming through the public API, read with the `openai` SDK and with raw HTTP.

OpenAI's image streaming (`stream: true`, `partial_images`), the opt-in progress events, chat
chunks, errors before and after the stream starts, cancellation by closing the stream, and the
OpenAI fields that now have a meaning (`quality`, `output_compression`, `background`, chat
`temperature`/`top_p`).
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest
from PIL import Image

from common.stage_config import load_stage_config
from harness.local_cluster import generate
from router.core.orchestrator import preview_steps
from tests.helpers import metric, noise_png, open_image

pytestmark = pytest.mark.quick

PROMPT = 'a lighthouse, "GLM" painted on it'


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def dit_defaults(cluster):
    return load_stage_config(cluster.stage_config).dit.default_sampling_params


def _sse(response: httpx.Response) -> list[tuple[str | None, dict | str]]:
    """(event name, parsed data) of every server-sent event of a streamed response."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append((name, data if data == "[DONE]" else json.loads(data)))
            name = None
    return events


def _stream(cluster, body: dict, path: str = "/v1/images/generations") -> tuple[int, list]:
    with httpx.stream("POST", f"{cluster.url}{path}", json=body, timeout=300) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, [response.json()]
        assert response.headers["content-type"].startswith("text/event-stream")
        return 200, _sse(response)


def test_sdk_streams_partial_images_then_the_same_image_as_unstreamed(cluster, client, dit_defaults):
    stream = client.images.generate(model=None, prompt=PROMPT, size="256x256", stream=True, partial_images=2,
                                    extra_body={"seed": 11})
    events = list(stream)
    kinds = [event.type for event in events]
    expected_previews = len(preview_steps(dit_defaults.num_inference_steps, 2))
    assert expected_previews >= 1
    assert kinds == ["image_generation.partial_image"] * expected_previews + ["image_generation.completed"]
    partial = events[0]
    assert [e.partial_image_index for e in events[:-1]] == list(range(expected_previews))
    assert (partial.size, partial.output_format, partial.background) == ("256x256", "png", "opaque")
    assert open_image(base64.b64decode(partial.b64_json)).size == (256, 256)
    completed = events[-1]
    assert completed.usage.output_tokens == 321  # the tiny model's 256x256 token count (see test_sizes)
    # The streamed image is byte-identical to the same request unstreamed: previews change nothing.
    plain = generate(cluster.url, seed=11, prompt=PROMPT, size="256x256", steps=None)
    assert plain.status_code == 200, plain.text
    assert base64.b64decode(completed.b64_json) == base64.b64decode(plain.json()["data"][0]["b64_json"])


def test_partial_images_zero_sends_only_the_completed_events(cluster):
    status, events = _stream(cluster, {"prompt": PROMPT, "size": "256x256", "stream": True, "n": 2, "seed": 3})
    assert status == 200
    assert [(name, data["image_index"]) for name, data in sorted(events, key=lambda e: e[1]["image_index"])] == [
        ("image_generation.completed", 0), ("image_generation.completed", 1)]
    assert [data["seed"] for _, data in sorted(events, key=lambda e: e[1]["image_index"])] == [3, 4]


def test_sdk_streams_an_edit(cluster, client):
    stream = client.images.edit(image=("cond.png", noise_png(320, 256), "image/png"), prompt=PROMPT, stream=True,
                                partial_images=1, extra_body={"seed": 5})
    events = list(stream)
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    # size "auto": the condition image's size, already valid
    assert open_image(base64.b64decode(events[-1].b64_json)).size == (320, 256)


def test_progress_events_are_opt_in_and_the_sdk_takes_them(cluster, client, dit_defaults):
    events = list(client.images.generate(prompt=PROMPT, size="256x256", stream=True,
                                         extra_body={"stream_progress": True, "seed": 2}))
    progress = [e.model_dump() for e in events if e.type == "image_generation.progress"]
    assert events[-1].type == "image_generation.completed"
    stages = [p["stage"] for p in progress]
    assert stages[0] == "queued" and "ar" in stages and "dit" in stages
    assert stages.index("dit") > max(i for i, s in enumerate(stages) if s == "ar")  # AR first, then DiT
    ar = [(p["done"], p["total"]) for p in progress if p["stage"] == "ar"]
    dit = [(p["done"], p["total"]) for p in progress if p["stage"] == "dit"]
    assert [d for d, _ in ar] == sorted(d for d, _ in ar) and ar[-1] == (321, 321)
    assert dit[-1] == (dit_defaults.num_inference_steps, dit_defaults.num_inference_steps)
    # Each stage's last event says how long the stage took.
    assert all("seconds" in [p for p in progress if p["stage"] == stage][-1] for stage in ("ar", "dit"))


def test_quality_presets_pick_the_configured_steps(cluster, dit_defaults):
    for quality in ("low", "high"):
        status, events = _stream(cluster, {"prompt": PROMPT, "size": "256x256", "stream": True,
                                           "stream_progress": True, "quality": quality, "seed": 1})
        assert status == 200
        dit_totals = {data["total"] for _, data in events if data.get("stage") == "dit"}
        assert dit_totals == {getattr(dit_defaults.quality_steps, quality)}
        assert events[-1][1]["quality"] == quality


def test_chat_stream_ends_with_the_image_chunk_and_done(cluster, client):
    chunks = list(client.chat.completions.create(
        model="glm-image-tiny", messages=[{"role": "user", "content": PROMPT}], stream=True,
        extra_body={"size": "256x256", "seed": 4}))
    assert len(chunks) == 1
    content = chunks[0].choices[0].delta.content
    assert chunks[0].choices[0].finish_reason == "stop"
    url = content[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert open_image(base64.b64decode(url.split(",", 1)[1])).size == (256, 256)
    with httpx.stream("POST", f"{cluster.url}/v1/chat/completions", timeout=300, json={
            "messages": [{"role": "user", "content": PROMPT}], "stream": True, "size": "256x256"}) as response:
        assert _sse(response)[-1] == (None, "[DONE]")


def test_output_compression_sets_the_jpeg_quality(cluster):
    sizes = []
    for compression in (10, 95):
        response = generate(cluster.url, seed=1, prompt=PROMPT, size="256x256", steps=1, output_format="jpeg",
                            output_compression=compression, moderation="auto", style="vivid", background="opaque")
        assert response.status_code == 200, response.text
        raw = base64.b64decode(response.json()["data"][0]["b64_json"])
        assert Image.open(io.BytesIO(raw)).format == "JPEG"
        sizes.append(len(raw))
    assert sizes[0] < sizes[1]


def test_errors_before_the_stream_keep_their_status(cluster):
    status, body = _stream(cluster, {"prompt": PROMPT, "size": "1000x1000", "stream": True})
    assert status == 400 and "nearest valid size is 992x992" in body[0]["error"]["message"]
    status, body = _stream(cluster, {"prompt": PROMPT, "stream": True, "background": "transparent"})
    assert status == 400 and "transparent" in body[0]["error"]["message"]


def test_streams_are_counted(cluster):
    before = metric(cluster, 'glm_router_http_streams_total{endpoint="/v1/images/generations"}')
    status, _ = _stream(cluster, {"prompt": PROMPT, "size": "256x256", "stream": True, "partial_images": 1})
    assert status == 200
    assert metric(cluster, 'glm_router_http_streams_total{endpoint="/v1/images/generations"}') == before + 1
    assert metric(cluster, 'glm_router_http_stream_events_total{kind="partial_image"}') >= 1
    assert metric(cluster, "glm_router_http_stream_first_event_seconds_count") >= 1


def test_closing_the_stream_cancels_the_denoising(cluster):
    """A client that goes away mid-DiT stops the DiT at its next step."""
    start = len(cluster.procs["dit-0"].log())
    body = {"prompt": PROMPT, "size": "1024x1024", "stream": True, "stream_progress": True,
            "num_inference_steps": 200, "seed": 9}
    with httpx.stream("POST", f"{cluster.url}/v1/images/generations", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("stage") == "dit":
                break  # the DiT is denoising: hang up
    cluster.wait_for_log("dit-0", r"job \S+\.dit\.\d+ cancelled after", timeout=30, start=start)
    # The worker is free again: the next request is served.
    assert generate(cluster.url, seed=1, prompt=PROMPT, size="256x256", steps=1).status_code == 200


def test_an_error_after_the_stream_started_is_an_error_event(no_dit):
    status, events = _stream(no_dit, {"prompt": PROMPT, "size": "256x256", "stream": True, "stream_progress": True})
    assert status == 200
    assert events[0][1]["stage"] == "queued"
    name, data = events[-1]
    assert name == "error" and data["error"]["code"] == 503 and "no live dit worker" in data["error"]["message"]
    client = openai.OpenAI(base_url=f"{no_dit.url}/v1", api_key="unused", timeout=60, max_retries=0)
    with pytest.raises(openai.APIError, match="no live dit worker"):
        list(client.images.generate(prompt=PROMPT, size="256x256", stream=True))
