"""Request and response bodies of the router's OpenAI-compatible HTTP API.

Requests are validated with the deployment's `Limits` passed as pydantic
validation context (`parse_body`), so a value over a configured limit fails
with a message that names the field and the limit. Every request model
forbids unknown fields: a typo like `num_inference_step` is a 400 naming the
field rather than a silently ignored option.

Sizes are resolved here too (`resolve_size`): an omitted size becomes the
configured default *before* the request goes further, so the default travels
down the pipeline exactly like an explicit size (see docs/model_facts.md for
the bug class this prevents).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from common.image_formats import OutputFormat
from common.sizes import ImageSize, InvalidSize, check_size
from common.stage_config import Limits
from router.core.errors import InvalidRequest
from router.core.image_request import MAX_SEED, SERVICE_TIERS, ServiceTier

M = TypeVar("M", bound=BaseModel)


NEGATIVE_PROMPT_DOC = (
    "Accepted for compatibility with other image APIs and passed through unchanged. "
    "GLM-Image has no negative-prompt conditioning (its unconditional CFG pass uses empty "
    "glyph text and no prior tokens), so it does not change the image. Leave it out unless needed."
)


def _limits(info: ValidationInfo) -> Limits | None:
    """The deployment limits passed by `parse_body`; None when validating without them (docs)."""
    return (info.context or {}).get("limits")


# Fields whose upper bound is a deployment limit: field -> (Limits attribute, unit in the message).
_LIMITED_FIELDS = {
    "n": ("max_n", " images per request"),
    "num_inference_steps": ("max_inference_steps", ""),
    "guidance_scale": ("max_guidance_scale", ""),
}


# OpenAI's `service_tier` values; "auto" is the API key's default tier, else "default".
REQUESTED_TIERS = ("auto", *sorted(SERVICE_TIERS))
RequestedTier = Literal["auto", "default", "flex", "priority"]


def resolve_service_tier(requested: RequestedTier | None, key_default: ServiceTier | None) -> ServiceTier:
    """The tier a request runs at: the one asked for, or for "auto" (or none) the API key's
    default tier, else "default"."""
    if requested is None or requested == "auto":
        return key_default or "default"
    return requested


def _check_seed_range(seed: int | None, n: int) -> None:
    if seed is not None and seed + n - 1 > MAX_SEED:
        raise PydanticCustomError("seed_range", "seed + n - 1 must be at most {max}", {"max": MAX_SEED})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraRequest(_Strict):
    """One LoRA adapter of a request (docs/lora.md)."""

    name: str = Field(..., min_length=1, max_length=64, description="An adapter listed by /v1/models.")
    scale: float = Field(1.0, ge=-10, le=10, allow_inf_nan=False,
                         description="How strongly the adapter applies (1: as trained, 0: not at all).")


class ImageOptions(_Strict):
    """Generation options shared by all endpoints (GLM-Image extras on top of OpenAI's `n`)."""

    n: int = Field(1, ge=1, description="Number of images; image i uses seed + i.")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED,
        description="Seed of the first image; image i uses seed + i. Default: the stage config's seed.")
    num_inference_steps: int | None = Field(
        None, ge=1, description="DiT denoising steps. Default: the stage config's value.")
    guidance_scale: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="DiT classifier-free guidance scale.")
    negative_prompt: str | None = Field(None, description=NEGATIVE_PROMPT_DOC)
    output_format: OutputFormat = Field("png", description="Encoding of the returned images.")
    output_compression: int | None = Field(
        None, ge=0, le=100,
        description="jpeg/webp only: the encoder quality, 100 keeping the most detail (OpenAI's scale). "
                    "Default 95; ignored for png.")
    quality: Literal["low", "medium", "high", "auto"] = Field(
        "auto", description="A preset of DiT denoising steps from the stage config (`dit.quality_steps`); "
                            "auto: the configured num_inference_steps. An explicit num_inference_steps wins.")
    background: Literal["auto", "opaque"] | None = Field(
        None, description='GLM-Image draws opaque images: "auto" and "opaque" are accepted, "transparent" '
                          "cannot be honoured.")
    service_tier: RequestedTier | None = Field(
        None, description='OpenAI\'s processing tier: "priority" is scheduled before "default", "default" before '
                          '"flex". "auto" (or none): the API key\'s default tier, else "default" (docs/scheduling.md).')
    loras: list[LoraRequest] | None = Field(
        None, max_length=16,
        description='LoRA adapters on the DiT, applied together: [{"name": "watercolor", "scale": 0.8}, ...] '
                    "(a JSON text in a multipart form). `model` may name one adapter instead (docs/lora.md).")

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_from_form(cls, value: Any) -> Any:
        # A multipart form field is text: the same list, as JSON.
        if isinstance(value, str):
            if len(value) > 16384:
                raise PydanticCustomError("loras_text", "is too long")
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                raise PydanticCustomError("loras_json", 'must be a JSON list like [{"name": "NAME", "scale": 0.8}]')
        return value

    @field_validator("service_tier", mode="before")
    @classmethod
    def _known_tier(cls, value: Any) -> Any:
        if value is not None and value not in REQUESTED_TIERS:
            raise PydanticCustomError("service_tier", "must be one of {allowed}",
                                      {"allowed": ", ".join(REQUESTED_TIERS)})
        return value

    @field_validator("background", mode="before")
    @classmethod
    def _no_transparency(cls, value: Any) -> Any:
        if value == "transparent":
            raise PydanticCustomError(
                "transparent_unsupported",
                'GLM-Image cannot draw transparent backgrounds: its VAE decodes RGB only; use "auto" or "opaque"')
        return value

    @field_validator("output_format", mode="before")
    @classmethod
    def _jpg_alias(cls, value: Any) -> Any:
        # "jpg" is what people type; the encoder calls it jpeg.
        return "jpeg" if isinstance(value, str) and value.lower() == "jpg" else value

    @field_validator(*_LIMITED_FIELDS)
    @classmethod
    def _within_deployment_limit(cls, value: Any, info: ValidationInfo) -> Any:
        limits = _limits(info)
        if value is None or limits is None:
            return value
        attribute, unit = _LIMITED_FIELDS[info.field_name]
        limit = getattr(limits, attribute)
        if value > limit:
            # The message leaves out the field name: validation_error_message puts it in front.
            raise PydanticCustomError("over_limit", "{value} exceeds the limit of {limit}{unit}",
                                      {"value": value, "limit": limit, "unit": unit})
        return value

    @field_validator("negative_prompt")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        # An empty negative prompt means "none"; passing "" on once doubled latency in a peer.
        return value if value is not None and value.strip() else None

    @model_validator(mode="after")
    def _seed_range_fits(self) -> "ImageOptions":
        _check_seed_range(self.seed, self.n)
        return self


def _check_prompt(value: str, info: ValidationInfo) -> str:
    if not value.strip():
        raise PydanticCustomError("empty_prompt", "must not be empty")
    limits = _limits(info)
    if limits is not None and len(value) > limits.max_prompt_chars:
        raise PydanticCustomError(
            "prompt_too_long", "{n} characters is too long; at most {limit} are allowed",
            {"n": len(value), "limit": limits.max_prompt_chars})
    return value


class _ImagesEndpointFields(ImageOptions):
    prompt: str = Field(..., description="What to draw. Text in quotes is rendered by the glyph encoder.")
    model: str | None = Field(None, description="Must be one of /v1/models when given.")
    response_format: Literal["b64_json"] | None = Field(
        "b64_json", description='Only "b64_json": images are returned inline.')
    user: str | None = Field(None, description="Accepted for OpenAI compatibility; unused.")
    stream: bool = Field(
        False, description="Stream server-sent events: partial images while denoising, then each image "
                           "as it completes (OpenAI's image streaming).")
    partial_images: int = Field(
        0, ge=0, le=3, description="With stream: previews of each image, decoded from the DiT's predicted "
                                   "clean latent at evenly spaced steps (fewer when there are few steps).")
    stream_progress: bool = Field(
        False, description="With stream: also send progress events (queue position, AR tokens, DiT steps, "
                           "retries). Not an OpenAI event: off unless asked for.")
    moderation: Literal["low", "auto"] | None = Field(
        None, description="Accepted for OpenAI compatibility; this server does no content moderation.")
    style: Literal["vivid", "natural"] | None = Field(
        None, description="Accepted for OpenAI compatibility; has no effect: describe the style in the prompt.")

    _prompt_ok = field_validator("prompt")(_check_prompt)

    @field_validator("response_format", mode="before")
    @classmethod
    def _only_b64(cls, value: Any) -> Any:
        if value == "url":
            raise PydanticCustomError(
                "url_unsupported",
                '"url" is not supported: this server returns images inline; use "b64_json"')
        return value


class ImageGenerationRequest(_ImagesEndpointFields):
    """Body of `POST /v1/images/generations` (OpenAI shape plus GLM-Image extras)."""

    size: str | None = Field(
        None, description='"WIDTHxHEIGHT", both multiples of 32 within the limits. '
                          'Default (and "auto"): the configured default size.',
        examples=["1024x1024"])


class ImageEditForm(_ImagesEndpointFields):
    """Non-file fields of `POST /v1/images/edits` (multipart/form-data)."""

    size: str | None = Field(
        "auto", description='"WIDTHxHEIGHT" or "auto" (default): the first image\'s size, '
                            "moved to the nearest valid size.")


# ---------------------------------------------------------------------------
# Chat completions: text-to-image and image-to-image through the chat API.


class ChatTextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatImageURL(_Strict):
    url: str = Field(..., description="A data URL: data:image/png;base64,...")
    detail: str | None = None


class ChatImageURLPart(_Strict):
    type: Literal["image_url"]
    image_url: ChatImageURL


ChatContentPart = Annotated[Union[ChatTextPart, ChatImageURLPart], Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None


class ChatImageOptions(ImageOptions):
    """Image options of a chat request, at the top level or inside `extra_body`."""

    size: str | None = Field(None, description='"WIDTHxHEIGHT" or "auto"; or give height and width.')
    height: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=1)


class ChatCompletionRequest(ChatImageOptions):
    """Body of `POST /v1/chat/completions`.

    The prompt is the text of the user messages; `image_url` parts (data URLs) in
    user messages make it image-to-image. Image options may sit at the top level
    or in an `extra_body` object (as vLLM-Omni's example client sends them); the
    same option in both places must have the same value.
    """

    messages: list[ChatMessage] = Field(..., min_length=1)
    model: str | None = None
    stream: bool = Field(
        False, description="Stream chat.completion.chunk events: one chunk per finished image whose delta "
                           "carries the image part, then [DONE].")
    stream_options: dict[str, Any] | None = Field(None, description="Accepted for OpenAI compatibility; unused.")
    temperature: float | None = Field(
        None, ge=0, le=2, allow_inf_nan=False,
        description="Sampling temperature of the AR stage (prior tokens); 0 is greedy. Default: the stage config's.")
    top_p: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling of the AR stage. Default: the stage config's.")
    max_tokens: int | None = Field(
        None, ge=1, description="Accepted for OpenAI compatibility; unused: the image size fixes the token count.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens.")
    user: str | None = None
    extra_body: ChatImageOptions | None = None

    @model_validator(mode="after")
    def _merge_extra_body(self) -> "ChatCompletionRequest":
        if self.extra_body is None:
            return self
        for name in self.extra_body.model_fields_set:
            value = getattr(self.extra_body, name)
            if name in self.model_fields_set and getattr(self, name) != value:
                raise PydanticCustomError(
                    "conflict", "{name} is given both at the top level ({top}) and in extra_body ({extra}) "
                    "with different values", {"name": name, "top": repr(getattr(self, name)), "extra": repr(value)})
            setattr(self, name, value)
            self.model_fields_set.add(name)
        # Re-check cross-field rules on the merged values (n from one place, seed from the other).
        _check_seed_range(self.seed, self.n)
        return self

    def prompt_text(self) -> str:
        """The text of all user messages, in order, joined by newlines."""
        texts: list[str] = []
        for message in self.messages:
            if message.role != "user" or message.content is None:
                continue
            if isinstance(message.content, str):
                texts.append(message.content)
            else:
                texts.extend(p.text for p in message.content if isinstance(p, ChatTextPart))
        return "\n".join(t for t in texts if t.strip())

    def image_urls(self) -> list[str]:
        """The URLs of the `image_url` parts of the user messages, in order."""
        return [
            part.image_url.url
            for message in self.messages
            if message.role == "user" and isinstance(message.content, list)
            for part in message.content
            if isinstance(part, ChatImageURLPart)
        ]

    def requested_size(self) -> ImageSize | str | None:
        """The size from `height`/`width` when given, else the `size` text, else None."""
        if (self.height is None) != (self.width is None):
            given = "height" if self.height is not None else "width"
            raise InvalidRequest(f"only {given} was given: give both height and width, or size")
        if self.height is None:
            return self.size
        from_sides = ImageSize(width=self.width, height=self.height)
        if self.size is not None and self.size.strip().lower() != str(from_sides):
            raise InvalidRequest(f"size {self.size!r} disagrees with width {self.width} and height {self.height}")
        return from_sides


# ---------------------------------------------------------------------------
# Responses.


class ImageData(BaseModel):
    b64_json: str
    seed: int
    revised_prompt: str | None = None


_TIER_DOC = ("The service tier the request ran at (OpenAI's field): never \"auto\", which becomes the API key's "
             "tier or \"default\".")


class ImagesResponse(BaseModel):
    """OpenAI images response plus what GLM-Image actually did."""

    created: int
    data: list[ImageData]
    service_tier: ServiceTier = Field(..., description=_TIER_DOC)
    size: str = Field(..., description="WIDTHxHEIGHT of the generated images.")
    output_format: str
    seeds: list[int]
    timings: list[dict[str, float]] = Field(..., description="Per image: seconds per stage and in total.")
    stage_sizes: list[dict[str, list[int]]] = Field(
        ..., description="Per image: the [height, width] each stage reported using.")


class ChatResponseImageURL(BaseModel):
    url: str


class ChatResponseImagePart(BaseModel):
    type: Literal["image_url"] = "image_url"
    image_url: ChatResponseImageURL


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: list[ChatResponseImagePart]


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    finish_reason: Literal["stop"] = "stop"


class ChatCompletionResponse(BaseModel):
    """OpenAI chat.completion; one choice per image, the image as a data URL."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    service_tier: ServiceTier = Field(..., description=_TIER_DOC)
    size: str
    output_format: str
    seeds: list[int]
    timings: list[dict[str, float]]
    stage_sizes: list[dict[str, list[int]]]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glm-image-serve"
    # vLLM's fields: a LoRA adapter's `root` is its file (in the adapter folder), its `parent` the base model.
    root: str | None = None
    parent: str | None = None


class LoadLoraAdapterRequest(_Strict):
    """Body of `POST /v1/load_lora_adapter` (vLLM's)."""

    lora_name: str = Field(..., description="The name requests use (`model` or `loras[].name`).")
    lora_path: str = Field(..., description="A .safetensors file (or a folder holding adapter_model.safetensors) "
                                            "inside the server's adapter folder, relative to it or absolute.")
    load_inplace: bool = Field(False, description="Replace an adapter already loaded under this name.")


class UnloadLoraAdapterRequest(_Strict):
    """Body of `POST /v1/unload_lora_adapter` (vLLM's)."""

    lora_name: str
    lora_int_id: int | None = Field(None, description="Accepted for vLLM compatibility; unused.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    # The HTTP status, or OpenAI's string code where OpenAI uses one ("invalid_api_key").
    code: int | str


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---------------------------------------------------------------------------
# Parsing helpers.


def validation_error_message(exc: ValidationError, max_errors: int = 3) -> str:
    """One line per problem, naming the field (dotted path) and what is wrong with it."""
    errors = exc.errors()
    # Union branches show up in loc as type names ("str", "list[...]"); they say nothing to a user.
    locs = [tuple(str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS)))
            for err in errors]
    lines: list[str] = []
    for err, loc in zip(errors, locs):
        # A union reports every branch; keep the deepest, most specific complaints.
        if any(len(other) > len(loc) and other[: len(loc)] == loc for other in locs):
            continue
        where = ".".join(loc)
        if err["type"] == "extra_forbidden":
            line = f"unknown field {where!r}"
        elif err["type"] == "missing":
            line = f"field {where!r} is required"
        else:
            msg = err["msg"]
            if err["type"] == "value_error":
                msg = msg.removeprefix("Value error, ")
            line = f"{where}: {msg}" if where else msg
        if line not in lines:
            lines.append(line)
    extra = len(lines) - max_errors
    text = "; ".join(lines[:max_errors])
    return text + (f" (and {extra} more)" if extra > 0 else "")


_UNION_TAGS = {"str", "int", "float", "bool", "none", "function-after", "function-before"}


def parse_body(model: type[M], data: Any, limits: Limits) -> M:
    """Validate `data` as `model` against the deployment limits; InvalidRequest (400) on failure."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data, context={"limits": limits})
    except ValidationError as exc:
        raise InvalidRequest(validation_error_message(exc)) from None


def resolve_size(size: ImageSize | str | None, limits: Limits, auto_size: ImageSize | None = None) -> ImageSize:
    """The size to generate.

    `None` means the endpoint default: "auto" where there is a condition image
    (`auto_size`, already a valid size), else `limits.default_size`. "auto"
    without a condition image is the default size too. Anything else must be a
    valid size ("WxH" text or an ImageSize); otherwise InvalidRequest names the
    rule and the nearest valid size.
    """
    if size is None:
        size = "auto" if auto_size else limits.default_size
    try:
        if isinstance(size, str):
            if size.strip().lower() == "auto":
                size = auto_size or limits.default_size
            if isinstance(size, str):
                size = ImageSize.parse(size)
        check_size(size, limits.size_limits)
    except InvalidSize as exc:
        raise InvalidRequest(str(exc)) from None
    return size
