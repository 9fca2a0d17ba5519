"""Fast tests of the HTTP edge's parsing: request schemas, size resolution, condition images and
the service tier.

No server: the functions the endpoints call are exercised directly, on real
Pillow images; the service tier also through the real app in-process (`recording_edge`), around a
backend that records the ImageRequest each endpoint builds.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from common.sizes import SIZE_MULTIPLE, ImageSize
from common.stage_config import Limits, StageConfig
from router.core.errors import InvalidRequest, PayloadTooLarge, ServiceError
from router.core.image_request import (
    EventListener,
    GeneratedImage,
    ImageBackend,
    ImageFinished,
    ImageRequest,
    StageProgress,
)
from router.edge.app import create_app
from router.edge.auth import ApiKeyConfig
from router.edge.images import decode_base64_image, decode_data_url, load_condition_image
from router.edge.schemas import (
    ChatCompletionRequest,
    ImageEditForm,
    ImageGenerationRequest,
    parse_body,
    resolve_size,
)
from tests.edge_app import NoWorkersBackend, edge_stage_config
from tests.helpers import chat, data_url, noise_png, open_image, png, png_claiming

pytestmark = pytest.mark.quick

LIMITS = Limits()


# ---------------------------------------------------------------------------
# Sizes


class TestResolveSize:
    def test_omitted_size_is_the_configured_default(self):
        assert resolve_size(None, LIMITS) == ImageSize(1024, 1024)
        assert resolve_size(None, Limits(default_size="768x512")) == ImageSize(768, 512)

    def test_auto_without_condition_image_is_the_default(self):
        assert resolve_size("auto", Limits(default_size="512x768")) == ImageSize(512, 768)

    def test_auto_and_omitted_use_the_condition_image_size_when_there_is_one(self):
        assert resolve_size("auto", LIMITS, auto_size=ImageSize(640, 480)) == ImageSize(640, 480)
        assert resolve_size(None, LIMITS, auto_size=ImageSize(640, 480)) == ImageSize(640, 480)

    def test_explicit_size_wins_over_auto_size(self):
        assert resolve_size("512x1024", LIMITS, auto_size=ImageSize(640, 480)) == ImageSize(512, 1024)
        assert resolve_size(" 1024X512 ", LIMITS) == ImageSize(1024, 512)

    def test_not_multiple_of_32_names_rule_and_nearest_size(self):
        with pytest.raises(InvalidRequest) as exc:
            resolve_size("1000x1000", LIMITS)
        assert exc.value.status_code == 400
        assert str(exc.value) == (
            "size 1000x1000 is not supported: both sides must be multiples of 32; the nearest valid size is 992x992")

    def test_multiple_of_16_only_is_rejected(self):
        # 1328 = 83 * 16: a peer crashes on it deep in the DiT.
        with pytest.raises(InvalidRequest, match="multiples of 32; the nearest valid size is"):
            resolve_size("1328x1328", LIMITS)

    def test_out_of_range_and_aspect_ratio(self):
        with pytest.raises(InvalidRequest, match="between 256 and 2048.*nearest valid size is 2048x2048"):
            resolve_size("4096x4096", LIMITS)
        with pytest.raises(InvalidRequest, match="aspect ratio must be at most 4:1"):
            resolve_size("2048x256", LIMITS)

    def test_malformed_size(self):
        with pytest.raises(InvalidRequest, match="not of the form WIDTHxHEIGHT"):
            resolve_size("large", LIMITS)

    def test_invalid_configured_default_is_reported(self):
        with pytest.raises(InvalidRequest, match="nearest valid size is 992x992"):
            resolve_size(None, Limits(default_size="1000x1000"))


# ---------------------------------------------------------------------------
# /v1/images/generations and /v1/images/edits bodies


class TestImageGenerationRequest:
    def test_defaults_leave_stage_defaults_and_negative_prompt_unset(self):
        body = parse_body(ImageGenerationRequest, {"prompt": "a cat"}, LIMITS)
        assert (body.n, body.size, body.seed, body.num_inference_steps, body.guidance_scale) == (1, None, None, None, None)
        assert body.negative_prompt is None
        assert body.output_format == "png"
        assert body.response_format == "b64_json"

    def test_all_options(self):
        body = parse_body(ImageGenerationRequest, {
            "prompt": "a sign that says \"hello\"", "model": "glm", "n": 3, "size": "512x512",
            "response_format": "b64_json", "output_format": "webp", "seed": 7,
            "num_inference_steps": 30, "guidance_scale": 2.5, "negative_prompt": "blurry"}, LIMITS)
        assert (body.n, body.seed, body.num_inference_steps, body.guidance_scale) == (3, 7, 30, 2.5)
        assert body.negative_prompt == "blurry"
        assert body.output_format == "webp"

    def test_unknown_field_is_named(self):
        with pytest.raises(InvalidRequest, match="unknown field 'num_inference_step'"):
            parse_body(ImageGenerationRequest, {"prompt": "x", "num_inference_step": 4}, LIMITS)

    def test_missing_and_empty_prompt(self):
        with pytest.raises(InvalidRequest, match="field 'prompt' is required"):
            parse_body(ImageGenerationRequest, {}, LIMITS)
        with pytest.raises(InvalidRequest, match="prompt: must not be empty"):
            parse_body(ImageGenerationRequest, {"prompt": "   "}, LIMITS)

    def test_prompt_length_limit(self):
        limits = Limits(max_prompt_chars=10)
        with pytest.raises(InvalidRequest, match="prompt: 11 characters is too long; at most 10"):
            parse_body(ImageGenerationRequest, {"prompt": "x" * 11}, limits)

    def test_limits_from_config(self):
        limits = Limits(max_n=2, max_inference_steps=20, max_guidance_scale=5.0)
        with pytest.raises(InvalidRequest, match="n: 3 exceeds the limit of 2 images per request"):
            parse_body(ImageGenerationRequest, {"prompt": "x", "n": 3}, limits)
        with pytest.raises(InvalidRequest, match="num_inference_steps: 21 exceeds the limit of 20"):
            parse_body(ImageGenerationRequest, {"prompt": "x", "num_inference_steps": 21}, limits)
        with pytest.raises(InvalidRequest, match="guidance_scale: 5.5 exceeds the limit of 5.0"):
            parse_body(ImageGenerationRequest, {"prompt": "x", "guidance_scale": 5.5}, limits)

    @pytest.mark.parametrize("field,value", [
        ("n", 0), ("seed", -1), ("num_inference_steps", 0), ("guidance_scale", -0.5),
        ("guidance_scale", float("nan")), ("output_format", "gif"), ("n", "many")])
    def test_out_of_range_values_name_the_field(self, field, value):
        with pytest.raises(InvalidRequest, match=f"^{field}: "):
            parse_body(ImageGenerationRequest, {"prompt": "x", field: value}, LIMITS)

    def test_url_response_format_says_only_b64_json(self):
        with pytest.raises(InvalidRequest, match='response_format: "url" is not supported.*b64_json'):
            parse_body(ImageGenerationRequest, {"prompt": "x", "response_format": "url"}, LIMITS)

    def test_jpg_alias_and_blank_negative_prompt(self):
        body = parse_body(ImageGenerationRequest, {"prompt": "x", "output_format": "jpg", "negative_prompt": ""}, LIMITS)
        assert body.output_format == "jpeg"
        assert body.negative_prompt is None

    def test_seed_range_must_fit_n_images(self):
        with pytest.raises(InvalidRequest, match="seed \\+ n - 1"):
            parse_body(ImageGenerationRequest, {"prompt": "x", "seed": 2**63 - 1, "n": 2}, LIMITS)

    def test_body_must_be_an_object(self):
        with pytest.raises(InvalidRequest, match="must be a JSON object, not list"):
            parse_body(ImageGenerationRequest, [{"prompt": "x"}], LIMITS)


class TestImageEditForm:
    def test_form_strings_are_converted_and_size_defaults_to_auto(self):
        body = parse_body(ImageEditForm, {"prompt": "make it blue", "n": "2", "seed": "5",
                                          "guidance_scale": "1.5"}, LIMITS)
        assert (body.n, body.seed, body.guidance_scale, body.size) == (2, 5, 1.5, "auto")
        assert resolve_size(body.size, LIMITS, auto_size=ImageSize(640, 480)) == ImageSize(640, 480)

    def test_unknown_form_field(self):
        with pytest.raises(InvalidRequest, match="unknown field 'strength'"):
            parse_body(ImageEditForm, {"prompt": "x", "strength": "0.5"}, LIMITS)

    def test_openai_streaming_form_fields(self):
        body = parse_body(ImageEditForm, {"prompt": "x", "stream": "true", "partial_images": "2", "quality": "low",
                                          "stream_progress": "true", "output_compression": "80"}, LIMITS)
        assert (body.stream, body.partial_images, body.quality, body.stream_progress, body.output_compression) == (
            True, 2, "low", True, 80)
        with pytest.raises(InvalidRequest, match="quality: Input should be 'low', 'medium', 'high' or 'auto'"):
            parse_body(ImageEditForm, {"prompt": "x", "quality": "hd"}, LIMITS)


# ---------------------------------------------------------------------------
# /v1/chat/completions bodies


class TestChatCompletionRequest:
    def test_vllm_omni_extra_body(self):
        body = parse_body(ChatCompletionRequest, chat("a dog", extra_body={
            "height": 512, "width": 768, "num_inference_steps": 20, "guidance_scale": 1.5, "seed": 42}), LIMITS)
        assert body.requested_size() == ImageSize(width=768, height=512)
        assert resolve_size(body.requested_size(), LIMITS) == ImageSize(768, 512)
        assert (body.num_inference_steps, body.guidance_scale, body.seed) == (20, 1.5, 42)

    def test_top_level_options_and_size(self):
        body = parse_body(ChatCompletionRequest, chat("a dog", size="512x512", n=2, seed=1), LIMITS)
        assert (body.requested_size(), body.n, body.seed) == ("512x512", 2, 1)

    def test_no_size_means_default(self):
        body = parse_body(ChatCompletionRequest, chat("a dog"), LIMITS)
        assert body.requested_size() is None
        assert resolve_size(body.requested_size(), LIMITS) == ImageSize(1024, 1024)

    def test_same_option_in_both_places_must_agree(self):
        parse_body(ChatCompletionRequest, chat("x", seed=3, extra_body={"seed": 3}), LIMITS)
        with pytest.raises(InvalidRequest, match="seed is given both at the top level \\(3\\) and in extra_body \\(4\\)"):
            parse_body(ChatCompletionRequest, chat("x", seed=3, extra_body={"seed": 4}), LIMITS)

    def test_extra_body_is_validated_against_limits(self):
        with pytest.raises(InvalidRequest, match="extra_body.num_inference_steps: 500 exceeds the limit of 200"):
            parse_body(ChatCompletionRequest, chat("x", extra_body={"num_inference_steps": 500}), LIMITS)
        with pytest.raises(InvalidRequest, match="unknown field 'extra_body.temperature'"):
            parse_body(ChatCompletionRequest, chat("x", extra_body={"temperature": 0.5}), LIMITS)

    def test_only_one_side_given(self):
        body = parse_body(ChatCompletionRequest, chat("x", extra_body={"height": 512}), LIMITS)
        with pytest.raises(InvalidRequest, match="only height was given: give both height and width"):
            body.requested_size()

    def test_size_and_sides_must_agree(self):
        body = parse_body(ChatCompletionRequest, chat("x", size="512x512", height=512, width=768), LIMITS)
        with pytest.raises(InvalidRequest, match="disagrees"):
            body.requested_size()

    def test_invalid_sides_get_the_size_message(self):
        body = parse_body(ChatCompletionRequest, chat("x", height=1000, width=1000), LIMITS)
        with pytest.raises(InvalidRequest, match="nearest valid size is 992x992"):
            resolve_size(body.requested_size(), LIMITS)

    def test_prompt_is_the_user_text_and_images_are_collected(self):
        url = data_url(png(64, 64))
        body = parse_body(ChatCompletionRequest, {"messages": [
            {"role": "system", "content": "You are an artist."},
            {"role": "user", "content": [{"type": "text", "text": "make the sky"},
                                         {"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "purple"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "and add a moon"}]}, LIMITS)
        assert body.prompt_text() == "make the sky\npurple\nand add a moon"
        assert body.image_urls() == [url]

    def test_no_user_text(self):
        body = parse_body(ChatCompletionRequest, {"messages": [{"role": "system", "content": "hi"}]}, LIMITS)
        assert body.prompt_text() == ""

    def test_bad_part_type_is_reported_once_and_precisely(self):
        with pytest.raises(InvalidRequest) as exc:
            parse_body(ChatCompletionRequest, chat([{"type": "txt", "text": "x"}]), LIMITS)
        assert str(exc.value).startswith("messages.0.content.0: Input tag 'txt'")
        assert "valid string" not in str(exc.value)

    def test_openai_sampling_fields_are_accepted_and_unknown_fields_rejected(self):
        body = parse_body(ChatCompletionRequest, chat("x", stream=True, temperature=0.5, top_p=0.9, max_tokens=10), LIMITS)
        assert (body.stream, body.temperature, body.top_p, body.max_tokens) == (True, 0.5, 0.9, 10)
        with pytest.raises(InvalidRequest, match="temperature: Input should be less than or equal to 2"):
            parse_body(ChatCompletionRequest, chat("x", temperature=3), LIMITS)
        with pytest.raises(InvalidRequest, match="unknown field 'frequency_penalty'"):
            parse_body(ChatCompletionRequest, chat("x", frequency_penalty=1.0), LIMITS)


# ---------------------------------------------------------------------------
# Data URLs and base64


class TestDataUrls:
    def test_round_trip(self):
        raw = png(40, 30)
        assert decode_data_url(data_url(raw), LIMITS, "image_url[0]") == raw
        assert decode_data_url(data_url(raw, media="image/jpeg"), LIMITS, "image_url[0]") == raw

    def test_line_wrapped_and_unpadded_base64_is_accepted(self):
        raw = png(41, 29)
        encoded = base64.b64encode(raw).decode()
        wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
        assert decode_base64_image(wrapped, LIMITS, "img") == raw
        assert decode_base64_image(encoded.rstrip("="), LIMITS, "img") == raw

    @pytest.mark.parametrize("url", ["https://example.com/cat.png", "http://10.0.0.1/x.png", "file:///etc/passwd"])
    def test_only_data_urls(self, url):
        with pytest.raises(InvalidRequest, match="image_url\\[0\\]: only data URLs are accepted"):
            decode_data_url(url, LIMITS, "image_url[0]")

    def test_not_base64_data_url(self):
        with pytest.raises(InvalidRequest, match="is not a base64 data URL"):
            decode_data_url("data:image/png,rawbytes", LIMITS, "image_url[0]")
        with pytest.raises(InvalidRequest, match="media type 'text/plain'"):
            decode_data_url("data:text/plain;base64,aGVsbG8=", LIMITS, "image_url[0]")

    def test_invalid_base64(self):
        with pytest.raises(InvalidRequest, match="image_url\\[0\\] is not valid base64"):
            decode_data_url("data:image/png;base64,iVBOR*w0K", LIMITS, "image_url[0]")

    def test_too_many_bytes_is_413_before_and_after_decoding(self):
        limits = Limits(max_upload_bytes=4096)
        huge = base64.b64encode(b"\0" * 100_000).decode()
        with pytest.raises(PayloadTooLarge, match="at most 4096 bytes") as exc:
            decode_base64_image(huge, limits, "img")
        assert exc.value.status_code == 413
        just_over = base64.b64encode(b"\0" * 4097).decode()
        with pytest.raises(PayloadTooLarge, match="img is 4097 bytes"):
            decode_base64_image(just_over, limits, "img")


# ---------------------------------------------------------------------------
# Condition images


class TestConditionImages:
    def test_valid_size_is_kept_and_output_is_rgb_png(self):
        cond = load_condition_image(png(512, 768), LIMITS, "image[0]")
        assert cond.size == ImageSize(512, 768)
        image = open_image(cond.png)
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (512, 768))
        assert image.getpixel((10, 10)) == (200, 30, 30)

    @pytest.mark.parametrize("width,height", [(1000, 600), (333, 777), (2500, 1400), (50, 40), (3000, 300), (257, 1030)])
    def test_normalised_to_multiples_of_32_within_limits(self, width, height):
        cond = load_condition_image(png(width, height), LIMITS, "image[0]")
        w, h = open_image(cond.png).size
        assert ImageSize(w, h) == cond.size
        assert w % SIZE_MULTIPLE == 0 and h % SIZE_MULTIPLE == 0
        assert LIMITS.min_side <= w <= LIMITS.max_side and LIMITS.min_side <= h <= LIMITS.max_side
        assert max(w, h) / min(w, h) <= LIMITS.max_aspect_ratio
        source_ratio = min(max(width / height, 1 / LIMITS.max_aspect_ratio), LIMITS.max_aspect_ratio)
        assert abs(w / h - source_ratio) / source_ratio < 0.1

    def test_nearest_size_for_a_typical_photo(self):
        assert load_condition_image(png(1000, 600), LIMITS, "image[0]").size == ImageSize(992, 608)

    def test_transparency_becomes_white(self):
        cond = load_condition_image(png(256, 256, "RGBA", (0, 0, 0, 0)), LIMITS, "image[0]")
        image = open_image(cond.png)
        assert image.mode == "RGB" and image.getpixel((5, 5)) == (255, 255, 255)

    def test_grayscale_and_jpeg_and_webp_inputs(self):
        for fmt, mode in [("JPEG", "L"), ("WEBP", "RGB"), ("PNG", "P")]:
            out = io.BytesIO()
            Image.new(mode, (300, 300), 128).save(out, format=fmt)
            cond = load_condition_image(out.getvalue(), LIMITS, "image[0]")
            assert open_image(cond.png).mode == "RGB" and cond.size == ImageSize(288, 288)

    def test_decompression_bomb_rejected_from_the_header(self):
        # Over our limit but under Pillow's own guard: our header check must catch it.
        bomb = png_claiming(5000, 5000)
        with pytest.raises(InvalidRequest, match="image\\[0\\] is 5000x5000 = 25000000 pixels; at most 16777216"):
            load_condition_image(bomb, LIMITS, "image[0]")
        # Far over Pillow's guard (2 x Image.MAX_IMAGE_PIXELS): same kind of message.
        with pytest.raises(InvalidRequest, match=f"image\\[0\\] has more than {2 * Image.MAX_IMAGE_PIXELS} pixels; at most 16777216 pixels"):
            load_condition_image(png_claiming(60_000, 60_000), LIMITS, "image[0]")

    def test_pixel_limit_from_config(self):
        with pytest.raises(InvalidRequest, match="at most 10000 pixels"):
            load_condition_image(png(128, 128), Limits(max_image_pixels=10_000), "image[0]")

    def test_truncated_png(self):
        whole = noise_png(256, 256)
        with pytest.raises(InvalidRequest, match="image\\[1\\] could not be decoded: the PNG data is truncated or corrupt"):
            load_condition_image(whole[: len(whole) // 2], LIMITS, "image[1]")

    def test_non_image_bytes(self):
        with pytest.raises(InvalidRequest, match="image\\[0\\] is not a PNG, JPEG or WebP image"):
            load_condition_image(b"this is not an image at all" * 10, LIMITS, "image[0]")

    def test_other_formats_are_not_opened(self):
        out = io.BytesIO()
        Image.new("RGB", (64, 64)).save(out, format="GIF")
        with pytest.raises(InvalidRequest, match="is not a PNG, JPEG or WebP image"):
            load_condition_image(out.getvalue(), LIMITS, "image[0]")

    def test_empty_and_oversized_files(self):
        with pytest.raises(InvalidRequest, match="image\\[0\\] is empty"):
            load_condition_image(b"", LIMITS, "image[0]")
        with pytest.raises(PayloadTooLarge):
            load_condition_image(noise_png(64, 64), Limits(max_upload_bytes=1024), "image[0]")

    def test_from_data_url_end_to_end(self):
        raw = decode_data_url(data_url(png(640, 480)), LIMITS, "image_url[0]")
        cond = load_condition_image(raw, LIMITS, "image_url[0]")
        assert cond.size == ImageSize(640, 480)


# ---------------------------------------------------------------------------
# service_tier: OpenAI's field on every endpoint, into ImageRequest.service_tier


class RecordingBackend(NoWorkersBackend):
    """Keeps each ImageRequest an endpoint built (`requests`), then fails with `error` when one is
    set, else answers n tiny fake images: enough for the edge's parsing and responses."""

    def __init__(self, config: StageConfig, error: ServiceError | None = None):
        super().__init__(config)
        self.error = error

    async def generate(self, request: ImageRequest, listener: EventListener | None = None) -> list[GeneratedImage]:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        images = [GeneratedImage(png(32, 32), "png", (request.seed or 0) + i, request.size, {"total_s": 0.0},
                                 {"ar": request.size, "dit": request.size}) for i in range(request.n)]
        for i, image in enumerate(images):
            if listener is not None:
                listener(StageProgress(i, "queued", position=i))
                listener(ImageFinished(i, image))
        return images


@contextmanager
def recording_edge(api_keys: ApiKeyConfig | None = None,
                   error: ServiceError | None = None) -> Iterator[tuple[TestClient, RecordingBackend]]:
    """The real app (middlewares, API keys when given, schemas, endpoints) around a RecordingBackend."""
    backend = RecordingBackend(edge_stage_config(), error)
    typed: ImageBackend = backend
    with TestClient(create_app(typed, CollectorRegistry(), api_keys=api_keys)) as client:
        yield client, backend


GEN, EDIT, CHAT = "/v1/images/generations", "/v1/images/edits", "/v1/chat/completions"


def post_with_tier(client: TestClient, path: str, tier: object = None, headers: dict | None = None, **body):
    """A minimal valid request to `path` with `service_tier` (left out when None)."""
    fields: dict = {"prompt": "a cat", "size": "256x256", **body}
    if tier is not None:
        fields["service_tier"] = tier
    if path == EDIT:
        return client.post(path, files=[("image", ("a.png", png(64, 64), "image/png"))],
                           data={k: str(v) for k, v in fields.items()}, headers=headers)
    if path == CHAT:
        prompt = fields.pop("prompt")
        return client.post(path, json=chat(prompt, **fields), headers=headers)
    return client.post(path, json=fields, headers=headers)


class TestServiceTier:
    @pytest.mark.parametrize("model", [ImageGenerationRequest, ImageEditForm])
    def test_images_bodies_accept_the_openai_values(self, model):
        for tier in ("auto", "default", "flex", "priority"):
            assert parse_body(model, {"prompt": "x", "service_tier": tier}, LIMITS).service_tier == tier
        assert parse_body(model, {"prompt": "x"}, LIMITS).service_tier is None

    def test_chat_top_level_and_extra_body(self):
        assert parse_body(ChatCompletionRequest, chat("x", service_tier="flex"), LIMITS).service_tier == "flex"
        body = parse_body(ChatCompletionRequest, chat("x", extra_body={"service_tier": "priority"}), LIMITS)
        assert body.service_tier == "priority"
        with pytest.raises(InvalidRequest, match="service_tier is given both"):
            parse_body(ChatCompletionRequest, chat("x", service_tier="flex", extra_body={"service_tier": "priority"}),
                       LIMITS)

    @pytest.mark.parametrize("value", ["fast", "Priority", "scale", "", 1, True, ["flex"]])
    @pytest.mark.parametrize("model", [ImageGenerationRequest, ImageEditForm, ChatCompletionRequest])
    def test_other_values_name_the_allowed_ones(self, model, value):
        data = chat("x", service_tier=value) if model is ChatCompletionRequest else {"prompt": "x", "service_tier": value}
        with pytest.raises(InvalidRequest) as exc:
            parse_body(model, data, LIMITS)
        assert str(exc.value) == "service_tier: must be one of auto, default, flex, priority"

    @pytest.mark.parametrize("path", [GEN, EDIT, CHAT])
    def test_each_endpoint_puts_the_tier_into_the_image_request(self, path):
        with recording_edge() as (client, backend):
            for sent, expected in [(None, "default"), ("auto", "default"), ("default", "default"), ("flex", "flex"),
                                   ("priority", "priority")]:
                response = post_with_tier(client, path, sent)
                assert response.status_code == 200, response.text
                request = backend.requests[-1]
                assert request.service_tier == expected, sent
                # Without API keys everyone is one tenant, without a cap.
                assert (request.tenant, request.tenant_max_images) == ("anonymous", None)
                # The response says the tier it ran at, as OpenAI's does.
                assert response.json()["service_tier"] == expected

    @pytest.mark.parametrize("path", [GEN, EDIT, CHAT])
    def test_a_bad_tier_is_a_400_before_the_backend(self, path):
        with recording_edge() as (client, backend):
            response = post_with_tier(client, path, "turbo")
            assert response.status_code == 400
            assert response.json()["error"] == {
                "message": "service_tier: must be one of auto, default, flex, priority",
                "type": "invalid_request_error", "param": None, "code": 400}
            assert backend.requests == []

    def test_streamed_requests_carry_the_tier(self):
        with recording_edge() as (client, backend):
            response = post_with_tier(client, GEN, "flex", stream=True)
            assert response.status_code == 200 and "image_generation.completed" in response.text
            response = post_with_tier(client, CHAT, "priority", stream=True)
            assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
            first_chunk = json.loads(response.text.split("data: ", 2)[1])
            assert first_chunk["object"] == "chat.completion.chunk" and first_chunk["service_tier"] == "priority"
            assert [r.service_tier for r in backend.requests] == ["flex", "priority"]
